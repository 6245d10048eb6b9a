# Round 9: vLLM's steps above the kernels' row limits compiled with the ops' unfused path written
# into the graph (convgpt_core.graph_pass, a compile range boundary at 256 tokens): does the
# prefill stop waiting on the host?  The pass under Inductor on the GPU (torch 2.11), vLLM end to
# end with traces against round 7 (same settings), then bf16 parity with a 512-token prefill
# budget, so the matrix's 490-token prompt runs through the graph for large steps.  Run by
# `gpu.sh bg benchmarks/gpu/round9.sh` after the vLLM parts are staged and installed.  Most
# needed first.
G="bash benchmarks/gpu/gpu.sh"
R=/root/results
(export PYTHONPATH=$PWD/src:$PWD/tests
 python3 -m pytest -q -rf tests/core/test_kernels.py -k "unfused or under_inductor" -p no:cacheprovider 2>&1 \
   | tail -30 > $R/kernel_tests_r9.txt)
$G e2e vllm - e2e_vllm_h200_r9 --rounds 5 --decode-tokens 128 --trace /root/trace-vllm
CONVGPT_PARITY_CHUNK=512 CONVGPT_PARITY_GEOMETRIES=untied-F36-k5-kv1 PARITY_TIMEOUT=420 \
  $G parity vllm - parity_vllm_h200_bf16_r9_chunk512
