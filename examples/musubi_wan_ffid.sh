#!/usr/bin/env bash
# Selective full finetuning of Wan 2.1 T2V 14B with an unmodified musubi-tuner, then a merged
# checkpoint for ComfyUI / wan_generate_video.py. Run from musubi-tuner's folder, in its venv,
# with ffid installed there (pip install ffid). Paths are examples: edit the four below.
set -euo pipefail

DIT=/models/wan2.1_t2v_14B_bf16.safetensors
VAE=/models/wan_2.1_vae.safetensors
DATASET=dataset.toml
NAME=character1
FF=0.01     # fraction of the model trained (1% = 143M of 14.3B weights)
FFID=1      # selection id: another character gets another id, never the same weights

# Memory check first (GPU, host RAM, delta size); reads only the checkpoint header.
ffid estimate "$DIT" --ff "$FF" --optimizer adamw8bit --blocks_to_swap 20

accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 src/musubi_tuner/wan_train_network.py \
  --task t2v-14B --dit "$DIT" --vae "$VAE" \
  --dataset_config "$DATASET" \
  --sdpa --mixed_precision bf16 \
  --gradient_checkpointing --blocks_to_swap 20 \
  --optimizer_type AdamW8bit --learning_rate 1e-4 --max_grad_norm 1.0 \
  --timestep_sampling shift --discrete_flow_shift 3.0 \
  --max_data_loader_n_workers 2 --persistent_data_loader_workers \
  --max_train_epochs 16 --save_every_n_epochs 2 --save_state --seed 42 \
  --network_module ffid.integrations.musubi \
  --network_args "ff=$FF" "ffid=$FFID" \
  --output_dir output --output_name "$NAME"

# To resume: add --resume output/$NAME-000008-state (same network_args).
# To continue from a saved delta: add --network_weights output/$NAME-000008.safetensors.

ffid inspect "output/$NAME.safetensors"
ffid merge "$DIT" "output/$NAME.safetensors" -o "output/wan2.1_t2v_14B_$NAME.safetensors"
