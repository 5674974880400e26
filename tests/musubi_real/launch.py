"""Run musubi-tuner's own Wan code, unmodified, on a CPU-only machine (for tests/test_musubi_real.py).

Run with the musubi virtual environment's python (``.venv-musubi``, made by ``.ci/run``), with
musubi-tuner's ``src`` and ffid's ``src`` on ``PYTHONPATH``::

    python launch.py prepare DIR                       # tiny DiT, caches in musubi's format, dataset config
    python launch.py train [OPTIONS] -- ARGS...        # musubi_tuner.wan_train_network.main() with ARGS
                                                       # (--prepare DIR first, --cpu-swap)
    python launch.py expect-errors ARGS... --- ARGS...  # several runs that must stop with an error
    python launch.py diff BASE MERGED OUT              # load both with musubi's Wan loader and
                                                       # write the positions that differ

Only what a CPU-only machine needs is changed, in this process, before musubi is imported
(see /work/shared/third_party/README.md); musubi's files are never modified:

* ``torchvision``: only CUDA builds exist here and they cannot load with a CPU torch;
  ``wan_train_network.py`` imports it at module level but uses it only for sampling, so a stub
  module stands in (any use raises).
* ``torch.cuda.current_device``: ``wan/modules/t5.py`` calls it in a default argument at import
  time; it returns 0 here (the T5 is never built in training from caches).
* a tiny Wan config ``t2v-tiny`` is added to ``WAN_CONFIGS`` (before musubi's parser reads the
  task choices).
* ``--cpu-swap``: musubi's CPU fallback ``swap_weight_devices_no_cuda`` (documented there as
  "not tested") makes two blocks share one storage on a CPU (``.to("cpu")`` returns the same
  tensor), so it is replaced by the same exchange with a real copy, and ``torch.cuda.set_device``
  (called by its offloader thread) becomes a no-op.
* ``--pretend FSDP|DEEPSPEED`` (``expect-errors`` runs): neither can run on one CPU process;
  accelerate's shared state is set to that type right after musubi creates its Accelerator, so
  the refusal runs on musubi's own call path.
"""

from __future__ import annotations

import copy
import importlib.machinery
import json
import os
import sys
import types

import torch

TASK = "t2v-tiny"
TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=3, freq_dim=256)
LATENT_CHANNELS = 16  # Wan 2.1 VAE
TEXT_DIM = 4096  # umT5-XXL


def _stub_torchvision() -> None:
    class _Stub(types.ModuleType):
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            if name.startswith("__"):
                raise AttributeError(name)

            def unavailable(*args, **kwargs):  # type: ignore[no-untyped-def]
                raise RuntimeError(f"torchvision is a stub in this test process ({self.__name__}.{name})")

            return unavailable

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.io")
    for name in names:
        mod = _Stub(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__path__ = []  # a package, so submodule imports resolve to the stubs
        sys.modules[name] = mod
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]  # type: ignore[attr-defined]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]  # type: ignore[attr-defined]


def _cpu_shims() -> None:
    _stub_torchvision()
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: 0  # type: ignore[assignment]


def _register_tiny_config() -> None:
    from musubi_tuner.wan.configs import WAN_CONFIGS, t2v_1_3B

    cfg = copy.deepcopy(t2v_1_3B)
    cfg.__name__ = "Config: Wan T2V tiny (ffid tests)"
    cfg.update(TINY)
    WAN_CONFIGS[TASK] = cfg


def _cpu_swap() -> None:
    from musubi_tuner.modules import custom_offloading_utils as cou

    def swap_weight_devices_cpu(device, layer_to_cpu, layer_to_cuda):  # type: ignore[no-untyped-def]
        # musubi's swap_weight_devices_no_cuda, with a real copy for the block going out
        assert layer_to_cpu.__class__ == layer_to_cuda.__class__
        jobs = []
        for m_cpu, m_cuda in zip(layer_to_cpu.modules(), layer_to_cuda.modules(), strict=True):
            if hasattr(m_cpu, "weight") and m_cpu.weight is not None:
                jobs.append((m_cpu, m_cuda, m_cpu.weight.data, m_cuda.weight.data))
        for m_cpu, _m_cuda, cuda_view, _cpu_view in jobs:
            m_cpu.weight.data = cuda_view.data.to("cpu", copy=True)
        for _m_cpu, m_cuda, cuda_view, _cpu_view in jobs:
            cuda_view.copy_(m_cuda.weight.data)
            m_cuda.weight.data = cuda_view
        SWAPS["count"] += 1

    cou.swap_weight_devices_no_cuda = swap_weight_devices_cpu
    if not torch.cuda.is_available():
        torch.cuda.set_device = lambda device: None  # type: ignore[assignment]


SWAPS = {"count": 0}
PRETEND: dict[str, str | None] = {"kind": None}


def _pretend_hook() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from musubi_tuner.training import trainer_base

    original = trainer_base.prepare_accelerator

    def prepare_accelerator(args):  # type: ignore[no-untyped-def]
        accelerator = original(args)
        if PRETEND["kind"]:
            PartialState._shared_state["distributed_type"] = DistributedType[PRETEND["kind"]]
        return accelerator

    trainer_base.prepare_accelerator = prepare_accelerator


def prepare(root: str) -> None:
    """A tiny fp32 Wan DiT in musubi's (original) naming, two images' caches written by musubi's own
    cache writers, and the dataset config."""
    from musubi_tuner.dataset.cache_io import save_latent_cache_wan, save_text_encoder_output_cache_wan
    from musubi_tuner.dataset.image_video_dataset import ItemInfo
    from musubi_tuner.wan.modules.model import WanModel
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = WanModel(
        model_type="t2v",
        dim=TINY["dim"],
        ffn_dim=TINY["ffn_dim"],
        freq_dim=TINY["freq_dim"],
        in_dim=LATENT_CHANNELS,
        num_heads=TINY["num_heads"],
        num_layers=TINY["num_layers"],
        out_dim=LATENT_CHANNELS,
        text_len=512,
        attn_mode="torch",
    )
    # Wan zero-initialises its head: random values everywhere, so every tensor gets gradients at step 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "modulation" in name:
                p.copy_(torch.randn_like(p) / TINY["dim"] ** 0.5)
            else:
                p.copy_(0.05 * torch.randn_like(p))
    os.makedirs(root, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(root, "dit.safetensors"))
    # a second expert for --dit_high_noise: the same shapes, other values everywhere
    g = torch.Generator().manual_seed(1)
    high = {k: (v * (1 + 0.2 * torch.randn(v.shape, generator=g))).contiguous() for k, v in sd.items()}
    save_file(high, os.path.join(root, "dit_high.safetensors"))

    images, cache = os.path.join(root, "images"), os.path.join(root, "cache")
    os.makedirs(images, exist_ok=True)
    size = 64
    for i, name in enumerate(("alice", "bob")):
        g = torch.Generator().manual_seed(10 + i)
        Image.new("RGB", (size, size), (40 * i, 80, 120)).save(os.path.join(images, f"{name}.png"))
        caption = f"a photo of {name}"
        with open(os.path.join(images, f"{name}.txt"), "w") as f:
            f.write(caption)
        item = ItemInfo(os.path.join(images, f"{name}.png"), caption, (size, size))
        item.latent_cache_path = os.path.join(cache, f"{name}_{size:04d}x{size:04d}_wan.safetensors")
        item.text_encoder_output_cache_path = os.path.join(cache, f"{name}_wan_te.safetensors")
        latent = torch.randn(LATENT_CHANNELS, 1, size // 8, size // 8, generator=g)
        save_latent_cache_wan(item, latent, None, None, None)
        embed = torch.randn(7 + i, TEXT_DIM, generator=g).to(torch.bfloat16)
        save_text_encoder_output_cache_wan(item, embed)
    with open(os.path.join(root, "dataset.toml"), "w") as f:
        f.write(
            "[general]\n"
            f"resolution = [{size}, {size}]\n"
            'caption_extension = ".txt"\n'
            "batch_size = 1\n"
            "enable_bucket = false\n\n"
            "[[datasets]]\n"
            f"image_directory = {json.dumps(images)}\n"
            f"cache_directory = {json.dumps(cache)}\n"
            "num_repeats = 1\n"
        )


def train(argv: list[str]) -> None:
    cut = argv.index("--") if "--" in argv else -1
    opts, args = argv[: max(cut, 0)], argv[cut + 1 :]
    if "--prepare" in opts:
        prepare(opts[opts.index("--prepare") + 1])
    if "--cpu-swap" in opts:
        _cpu_swap()
    from musubi_tuner import wan_train_network

    sys.argv = ["wan_train_network.py", *args]
    wan_train_network.main()
    if "--cpu-swap" in opts:
        print(f"FFID_TEST_SWAPS={SWAPS['count']}")


def expect_errors(argv: list[str]) -> None:
    """Several musubi runs in this one process (imports paid once), each expected to stop with an
    error: ``[--pretend KIND] ARGS... --- [--pretend KIND] ARGS... ...``. Prints one line per run,
    ``FFID_TEST_RESULT[i]=ok`` or ``FFID_TEST_RESULT[i]=ErrorType: message``."""
    from musubi_tuner import wan_train_network

    _pretend_hook()
    runs: list[list[str]] = [[]]
    for a in argv:
        if a == "---":
            runs.append([])
        else:
            runs[-1].append(a)
    for i, args in enumerate(runs):
        PRETEND["kind"] = None
        if args[:1] == ["--pretend"]:
            PRETEND["kind"], args = args[1], args[2:]
        sys.argv = ["wan_train_network.py", *args]
        try:
            wan_train_network.main()
            result = "ok"
        except BaseException as e:  # SystemExit and assertion errors are results too
            result = f"{type(e).__name__}: {e}".replace("\n", " ")
        print(f"FFID_TEST_RESULT[{i}]={result}", flush=True)


def diff(base: str, merged: str, out: str) -> None:
    """Load both files with musubi's own Wan loader; write, per tensor, the flat positions that differ."""
    from musubi_tuner.wan.configs import WAN_CONFIGS
    from musubi_tuner.wan.modules.model import load_wan_model
    from safetensors.torch import save_file

    def load(path: str) -> dict[str, torch.Tensor]:
        model = load_wan_model(WAN_CONFIGS[TASK], "cpu", path, "torch", False, "cpu", torch.float32, False)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    a, b = load(base), load(merged)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    changed = {}
    for k in a:
        idx = (a[k].reshape(-1) != b[k].reshape(-1)).nonzero().reshape(-1)
        if idx.numel():
            changed[k] = idx.to(torch.int64)
    save_file(changed, out)
    print(f"FFID_TEST_CHANGED_TENSORS={len(changed)}")


def main() -> None:
    _cpu_shims()
    _register_tiny_config()
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "prepare":
        prepare(rest[0])
    elif cmd == "train":
        train(rest)
    elif cmd == "expect-errors":
        expect_errors(rest)
    elif cmd == "diff":
        diff(*rest)
    else:
        raise SystemExit(f"unknown command {cmd!r}: prepare, train or diff")


if __name__ == "__main__":
    main()
