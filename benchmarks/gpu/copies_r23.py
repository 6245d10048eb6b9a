"""Round 23: where the large copy kernels in SGLang's traces of round23b.sh run (the traces under
/root/trace-r23b, on the machine that made them).  Per trace: its kernels and their time, and
how many of them (and their time) are prefill attention, decode attention, copies over 20 us and
FlashInfer's RoPE kernel; then, for the first ConvGPT and the first twin trace, the kernels around
the first three of those copies (start relative to the copy, duration, name).

Usage: python3 benchmarks/gpu/copies_r23.py [TRACE_DIR]
"""

import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import steptrace  # noqa: E402


def big_copy(kernel) -> bool:
    return "direct_copy" in kernel[2] and kernel[1] > 20


def main(root: str) -> None:
    paths = sorted(glob.glob(f"{root}/*/*.json*"))
    for path in paths:
        ks = steptrace.kernels(path)
        line = [path.split("/")[-2], os.path.basename(path)[:14], f"{len(ks)} kernels {round(sum(k[1] for k in ks))} us;"]
        for label, pick in (("prefill", lambda k: "PrefillWithKVCache" in k[2]),
                            ("decode", lambda k: "BatchDecodeWithPagedKVCache" in k[2]),
                            ("bigcopy", big_copy), ("rope", lambda k: "fused_rope" in k[2])):
            some = [k for k in ks if pick(k)]
            line.append(f"{label} {len(some)} {round(sum(k[1] for k in some))}")
        print(" ".join(line))
    for path in [p for p in paths if "/convgpt" in p][:1] + [p for p in paths if "/twin" in p][:1]:
        ks = steptrace.kernels(path)
        big = [i for i, k in enumerate(ks) if big_copy(k)]
        print(f"== {path}: {len(big)} copies over 20 us")
        for i in big[:3]:
            for j in range(max(0, i - 4), min(len(ks), i + 3)):
                t, d, n = ks[j]
                print(f"  {'>>' if j == i else '  '} {t - ks[i][0]:10.1f} {d:8.1f} {n[:150]}")
            print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/root/trace-r23b")
