#!/usr/bin/env bash
# Everything only a GPU can show, in one call (a lent GPU's time is short): the CUDA-only tests, the Triton
# kernels compiled for real, the rollout engine with CUDA graphs at the Janus-Pro-1B shape, and a profile of it.
# Usage: bash bench/gpu_check.sh OUT_DIR [targets|skinny|sweep|final|engine|serve|judge]
#   targets: #3's two targets alone (the rollout benchmark, 2 repeats, with a profile), then the tests; the
#   shortest mode, for a lease of minutes (about 6 min on an H100);
#   skinny: the skinny-matmul kernel against cuBLAS, then the rollout benchmark with the engine's decode
#   projections through it as one more side (`skinny_matmul_speedup`), then the tests, then the kernel's launch
#   sweep (the rollout first: with every comparison side it took 290 s on an H100, after 21 s of kernel and
#   sampling benchmarks; the tests then ran past a 555 s limit, since on a fresh machine they compile every
#   Triton kernel: 68 s once compiled);
#   sweep: the decode launch-configuration sweep, one timed rollout with a profile, the tests;
#   final (default): every kernel benchmark with the decode sweep, the rollout benchmark (2 repeats) with a
#   profile, the tests, then the rollout against compiled transformers (as in engine);
#   engine: the skinny-matmul benchmark with its sweep and the small fused kernels (norms, RoPE + store, SwiGLU), the
#   rollout benchmark (2 repeats, fused vs unfused projections too) with a profile, the tests, and last the
#   rollout once more with transformers compiled as another baseline (`--hf-compile`);
#   serve: the serving benchmark at the Janus-Pro-1B shape (closed-loop levels, then open-loop Poisson arrivals
#   with and without window interrupts), then the tests;
#   judge: the reward benchmark at Qwen2.5-VL-7B's shape (graphed scoring and decoding vs one at a time), then
#   the tests (the judge's CUDA tests among them).
# The lent machines' image has torch and triton but another transformers, maybe another peft, and no fastapi,
# uvicorn or pydantic: carry them as wheels (.whl/: transformers 5.24.0, peft 0.21.2, and for serve fastapi,
# starlette, uvicorn, pydantic + pydantic_core for cp312, annotated-types, typing-inspection, typing-extensions,
# opentelemetry-api) installed with `pip install --no-deps --target /tmp/site` and PYTHONPATH=/tmp/site.
# Every rollout run but targets also times the engine with 64-step decode windows and with 16-step image windows
# (the default runs an image phase in one window): `window_speedup` and `image_window_speedup` say how much of the
# host gap at window boundaries (10% of the H100's wall time with 16-step windows everywhere) fewer windows close;
# with cascade attention off (`cascade_attn_speedup`: what reading each run's shared prefix once saves), and with
# programmatic dependent launch on (`pdl_speedup`); then the engine with every setting that won switched over
# (`--best-of-compared`: `best_settings`, `speedup_vs_hf_best`, `floor_fraction_best`), which the profile profiles;
# it splits the GPU's idle time into short gaps between kernels and long waits for the host (`gap_short_s`,
# `gap_long_s`, `kernels_per_step`).
# Results: OUT_DIR/{kernels,rollout}-<device>.json, tables and logs; the script goes on after a failing step and
# exits non-zero if any failed. The fused sampling extension (csrc/) builds in the background meanwhile.
set -uo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_DIR [targets|skinny|sweep|final|engine|serve|judge]}"
mode="${2:-final}"
python="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 GOTR1_CACHE="${GOTR1_CACHE:-/tmp/gotr1-cache}"
# The copy sent to a GPU machine has no .git: pass the commit along (GOTR1_GIT_COMMIT=$(git rev-parse --short HEAD)).
export GOTR1_GIT_COMMIT="${GOTR1_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
tag="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-' | sed 's/^nvidia-//')"
echo "device: $tag"
failed=0
step() {  # step NAME CMD...: run, log to OUT_DIR/NAME.log, report the time taken
  local name="$1" start=$SECONDS
  shift
  if "$@" >"$out/$name.log" 2>&1; then echo "ok   $name ($((SECONDS - start)) s)"
  else echo "FAIL $name ($((SECONDS - start)) s)"; tail -25 "$out/$name.log"; failed=1; fi
}

"$python" -c "from kernels.cfg_sampling import cuda_extension_available as a; print('extension', a())" \
  >"$out/extension.log" 2>&1 &
extension=$!
if [[ "$mode" == sweep ]]; then
  step decode-sweep "$python" -m bench kernels --device cuda --scale gpu --only decode --decode-sweep \
    --json "$out/decode-sweep-$tag.json"
elif [[ "$mode" == final ]]; then
  step kernels "$python" -m bench kernels --device cuda --scale gpu --decode-sweep --matmul-sweep \
    --json "$out/kernels-gpu-$tag.json"
elif [[ "$mode" == skinny ]]; then
  step skinny-matmul "$python" -m bench kernels --device cuda --scale gpu --only skinny_matmul \
    --json "$out/skinny-matmul-gpu-$tag.json"
elif [[ "$mode" == engine ]]; then
  step skinny-matmul "$python" -m bench kernels --device cuda --scale gpu --only skinny_matmul,rms_norm,rope,silu_mul \
    --matmul-sweep --json "$out/skinny-matmul-gpu-$tag.json"
fi
wait "$extension"
echo "cfg_sample extension: $(tail -1 "$out/extension.log")"
if [[ "$mode" == judge ]]; then
  step reward "$python" -m bench reward --judge-preset qwen2.5-vl-7b-shape --device cuda \
    --json "$out/reward-qwen7b-shape-$tag.json"
elif [[ "$mode" == serve ]]; then
  step serve "$python" -m bench serve --preset janus-pro-1b-shape --device cuda --request-rate 8 \
    --open-loop-rounds 2 --json "$out/serve-janus-pro-1b-shape-$tag.json"
else
  # seconds: the fused sampling kernel (rows split over blocks) against eager torch, text and image steps
  step sampling "$python" -m bench sampling --device cuda --json "$out/sampling-$tag.json"
  repeats=$([[ "$mode" == sweep ]] && echo 1 || echo 2)
  # targets: the committed figure alone; every other mode also times the settings still to decide
  compare=$([[ "$mode" != targets ]] && echo --compare-num-scheduler-steps 64 --compare-num-image-scheduler-steps 16 \
    --compare-cascade-attn --compare-pdl --best-of-compared)
  [[ "$mode" == skinny ]] && compare="$compare --compare-skinny-matmul"
  step rollout "$python" -m bench rollout --preset janus-pro-1b-shape --device cuda --repeats "$repeats" $compare \
    --profile "$out/rollout-profile-$tag.txt" --json "$out/rollout-janus-pro-1b-shape-$tag.json"
fi
# A hung CUDA test fails alone rather than taking the lease with it (pytest-timeout is in the lent image).
timeout=$("$python" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
step tests "$python" -m pytest -p no:cacheprovider --benchmark-disable $timeout tests/test_cuda_engine.py \
  tests/test_paged_attention.py tests/test_kv_cache.py tests/test_rms_norm.py tests/test_rope.py \
  tests/test_skinny_matmul.py tests/test_silu_mul.py \
  tests/test_cfg_sampling.py tests/test_judge_qwen.py tests/test_engine.py::test_triton_backend_equals_torch_backend
if [[ "$mode" == skinny ]]; then  # after the tests: the least needed of its figures
  step skinny-sweep "$python" -m bench kernels --device cuda --scale gpu --only skinny_matmul --matmul-sweep \
    --json "$out/skinny-matmul-sweep-gpu-$tag.json"
fi
if [[ "$mode" == engine || "$mode" == final ]]; then  # last: compiling transformers takes minutes
  step rollout-hf-compile "$python" -m bench rollout --preset janus-pro-1b-shape --device cuda --repeats 1 \
    --hf-compile --json "$out/rollout-hf-compile-janus-pro-1b-shape-$tag.json"
fi
for log in "$out"/*.log; do echo "== $log"; grep -E "passed|failed|fused_ms|pdl_speedup|best|gap_|kernels_per_step|failed_sides|speedup_vs_hf|multi_step_speedup|window_speedup|fused_projections|skinny_matmul_speedup|cascade_attn_speedup|speedup_batched|bw_fraction|skinny_matmul_time|busy|engine_ms|floor_ms|ttft|served_vs" "$log" | tail -8; done
exit "$failed"
