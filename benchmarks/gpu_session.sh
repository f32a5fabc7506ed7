#!/usr/bin/env bash
# One lent-GPU session's measurements, in priority order, each under its own time limit, every
# result written under $OUT as soon as it exists (a late failure loses nothing earlier):
#   1. throughput + MFU of GPT-2-small-shaped models (bf16; einsum vs cuDNN attention; 8-expert MoE)
#   2. SOAP / AdamW step time on the same 125M model
#   3. (PARTS="... gqvae") GQ-VAE tokenizer trainings far longer than the CPU allows; their parameters and
#      metrics come back as tars
#   4. (PARTS="... gqvae_table") the GQ-VAE robustness table's `:paper` rows: the paper's schedule
#      (15,000 steps) x 3 seeds, with `:cpu`'s objective and with the paper's
#      ($OUT/gqvae_robustness_paper.json, written after each run)
#
#   OUT=/tmp/out [PARTS="throughput soap gqvae"] bash benchmarks/gpu_session.sh            # on a machine with one GPU
#
# The machine's image has jax (CUDA) but not every pinned package: wheels carried in .whl/ are
# installed first (see BUILD.md, "GPU"). *_SECONDS bound each part (SIGTERM: the runner saves and
# exits cleanly).
set -u
OUT=${OUT:-/tmp/gpu_out}
LOGS=/tmp/gpu_logs  # logs travel as one tar: a lease returns at most 8 files
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 XLA_FLAGS=${XLA_FLAGS:-} PYTHONPATH=/tmp/site:$PWD
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$LOGS/pip.log" 2>&1 || { tail "$LOGS/pip.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
  | tee -a "$LOGS/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log
  local name=$1 seconds=$2; shift 2
  echo "=== $name ($(date +%T), limit ${seconds}s)"
  timeout -s TERM "$seconds" "$@" >"$LOGS/$name.log" 2>&1
  echo "=== $name exit $? ($(date +%T))"
  grep -v -i "warning" "$LOGS/$name.log" | grep -v "^I[0-9]" | tail -n 12
  tar -C /tmp -czf "$OUT/logs.tgz" gpu_logs
}

PARTS=" ${PARTS:-throughput soap} "

[[ $PARTS == *" throughput "* ]] && step throughput "${THROUGHPUT_SECONDS:-200}" python3 benchmarks/throughput.py \
  --models="${MODELS:-125m_bf16,125m_bf16_cudnn,moe_8x125m_bf16_cudnn}" --meshes=1x1x1 --steps 10 \
  --peak_dtype=bfloat16 --peak_size=8192 --compile_time=false --out "$OUT/throughput_gpu.json"

[[ $PARTS == *" soap "* ]] && step soap "${SOAP_SECONDS:-170}" python3 benchmarks/optimizers.py --part=step_time --optimizers=soap \
  --meshes=1x1x1 --experiment=experiments/dense_125m.py --seq_len=1024 --batch_size=32 --steps 10 --rounds 3 \
  --set=model.compute_dtype=bfloat16 --set=model.attention_impl=cudnn --out "$OUT/optimizers_gpu.json"

gqvae() {  # gqvae NAME EXPERIMENT OVERRIDES...: train, then send back its parameters + metrics
  local name=gqvae_$1 spec=$2; shift 2
  step "$name" "${GQVAE_SECONDS:-90}" python3 -m gqlm.train --config "$spec" --workdir "/tmp/$name" \
    --config.train.steps=100000 --config.train.checkpoint_every=500 --config.train.eval_every=500 \
    --config.train.log_every=100 --config.train.progress=false "$@"
  # The runner's checkpoint is mostly optimizer state; the parameters alone, in the format
  # gqlm.train.tasks.gqvae.checkpoint also reads, are what a tokenizer is built from.
  python3 benchmarks/gqvae_export.py "/tmp/$name" "/tmp/export/$name" >>"$LOGS/$name.log" 2>&1 \
    && tar -C /tmp/export -czf "$OUT/$name.tgz" "$name" && ls -la "$OUT/$name.tgz"
}

if [[ $PARTS == *" gqvae "* ]]; then  # the paper's schedule (500 warm-up steps, re-seeding every 250), batch 256
  paper=(--config.gqvae.batch_size=256 --config.gqvae.warmup_steps=500 --config.gqvae.reseed_every=250)
  gqvae c4k experiments/gqvae_shakespeare.py "${paper[@]}"
  gqvae c16k experiments/gqvae_shakespeare.py "${paper[@]}" --config.gqvae.codebook_size=16384
  gqvae c16k_gate1 experiments/gqvae_shakespeare.py "${paper[@]}" --config.gqvae.codebook_size=16384 \
    --config.gqvae.gate_loss_weight=1.0
fi

if [[ $PARTS == *" gqvae_table "* ]]; then  # docs/gqvae.md, "At real length": the `:paper` schedule
  for seed in 0 1 2; do
    for objective in "--gates bounded --targets 3.5" "--gates paper --targets 0"; do
      # shellcheck disable=SC2086  # $objective is two flags
      step "gqvae_table_${seed}_${objective// /_}" "${GQVAE_TABLE_SECONDS:-400}" python3 benchmarks/gqvae_robustness.py \
        --variant paper --steps 15000 --warmup 500 --reseed_every 250 --batch_size 256 --codebook 4096 \
        --log_every 100 --weights 3 $objective --seeds "$seed" --append --out "$OUT/gqvae_robustness_paper.json"
    done
  done
fi
