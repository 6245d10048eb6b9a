# Round 17: why ConvGPT's SGLang batch-1 decode fell from ~820 tok/s (round 8) to ~470 (round 16)
# while the twin's stayed at ~520-590.  SGLang alone (one staged part, /root/stage-sgl, installed
# first): decode at b256 and b1 as in round 16, traced on the timed engines (CUDA graphs on:
# kernels, CUDA runtime calls and CPU ops per step), then ConvGPT against itself with PDL off and
# with the q/k-norm + RoPE epilogue off (--b-env), then the GPU kernel tests round 16 left unrun
# (the 192-row PDL limit, the copied-weight rule).  `gpu.sh bg benchmarks/gpu/round17.sh`.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
E=(--prefill-n 0 --rounds 5 --decode-tokens 128 --gpu-mem 0.8)
$G e2e sglang - e2e_sglang_h200_r17_decode "${E[@]}" --twin-first --trace /root/trace-r17 --timed-trace-only
(cd /root/trace-r17 && tar czf $R/traces_r17_sglang.tgz .) || true
$G e2e sglang - e2e_sglang_h200_r17_pdl0 "${E[@]}" --b-env CONVGPT_PDL=0
$G e2e sglang - e2e_sglang_h200_r17_rope0 "${E[@]}" --b-env CONVGPT_QK_ROPE=0
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q tests/core/test_kernels.py -p no:cacheprovider -k "gpu and (pdl or norm_linear or narrow)" 2>&1 \
   | tail -5 > $R/kernel_tests_h200_r17.txt)
