"""cuDNN's FP8 attention (cudnn-frontend ``sdpa_fp8``) against torch's BF16 SDPA, the kernels
alone, at the attention shapes of FLUX.1-dev, Z-Image and Wan2.2 (batch 1, head dim 128).

    source benchmarks/device_setup.sh   # with nvidia_cudnn_frontend-1.14.1-*.whl in .whl
    python3 benchmarks/fp8_attention_probe.py --out benchmarks/results/fp8_attention_probe.json

Records per shape: BF16 SDPA ms and error against float32 attention; FP8 (Q, K, V scaled by their
amax, P by 448, O by V's scale, which bounds it: O's rows are convex combinations of V's) ms and
error, with an FP8 and a BF16 output (the second refused by frontend 1.14 on Hopper); the host
time of one call; whether a CUDA-graph capture replays it. Each stage is tried separately.
"""

import argparse
import json
import math
import time
import traceback

import torch
import torch.nn.functional as F

from fp8_compile import ops

from bench_dit import cuda_time_ms


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def quantize_per_tensor(t):
    """The shipped quantizer, with the scale shaped as cuDNN's graph declares it."""
    t8, scale = ops.quantize_activation(t, "per_tensor")
    return t8, scale.reshape(1, 1, 1, 1)


def build_fp8_graph(cudnn, handle, shape, strides, attn_scale, out_type):
    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    q, k, v = (graph.tensor(name=n, dim=shape, stride=strides, data_type=e4m3) for n in ("q", "k", "v"))
    scalars = [graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
               for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
    o, _, amax_s, amax_o = graph.sdpa_fp8(
        q=q, k=k, v=v, descale_q=scalars[0], descale_k=scalars[1], descale_v=scalars[2],
        descale_s=scalars[3], scale_s=scalars[4], scale_o=scalars[5],
        is_inference=True, attn_scale=attn_scale, use_causal_mask=False, name="sdpa_fp8",
    )
    o.set_output(True).set_dim(shape).set_stride(strides).set_data_type(out_type)
    for amax in (amax_s, amax_o):
        amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph, (q, k, v), scalars, o, (amax_s, amax_o)


def probe(cudnn, handle, h, s, iters):
    torch.manual_seed(0)
    b, d = 1, 128
    # BSHD storage (what a linear layer's output reshapes to), viewed as BHSD
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    q, k = q * 1.5, k * 1.5  # logits of a realistic spread after q/k RMSNorm
    result = {"shape": [b, h, s, d]}
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    result["bf16_sdpa_ms"] = cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v), 10, iters)
    result["bf16_sdpa_err"] = rel_err(F.scaled_dot_product_attention(q, k, v), reference)
    flops = 4 * b * h * s * s * d
    result["bf16_sdpa_tflops"] = flops / result["bf16_sdpa_ms"] / 1e9
    result["quantize_qkv_eager_ms"] = cuda_time_ms(lambda: [quantize_per_tensor(t) for t in (q, k, v)], 10, iters)
    (q8, sq), (k8, sk), (v8, sv) = (quantize_per_tensor(t) for t in (q, k, v))
    shape, strides = list(q8.shape), list(q8.stride())
    for name, out_type, out_dtype in [("fp8_out", cudnn.data_type.FP8_E4M3, torch.float8_e4m3fn),
                                      ("bf16_out", cudnn.data_type.BFLOAT16, torch.bfloat16)]:
        try:
            graph, (tq, tk, tv), scalars, to, (tas, tao) = build_fp8_graph(
                cudnn, handle, shape, strides, 1.0 / math.sqrt(d), out_type)
            o = torch.empty_strided(shape, strides, dtype=out_dtype, device="cuda")
            amax_s, amax_o = (torch.zeros(1, 1, 1, 1, device="cuda") for _ in range(2))
            # O's scale: V's (|O| <= max|V|); with a BF16 output O is not scaled
            o_scale = sv if out_dtype == torch.float8_e4m3fn else torch.ones_like(sv)
            scale_values = [sq, sk, sv, torch.full_like(sv, 1 / ops.FP8_MAX), torch.full_like(sv, ops.FP8_MAX), 1 / o_scale]
            pack = {tq: q8, tk: k8, tv: v8, to: o, tas: amax_s, tao: amax_o, **dict(zip(scalars, scale_values))}
            workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
            run = lambda: graph.execute(pack, workspace, handle=handle)
            run()
            torch.cuda.synchronize()
            out = o.float() * o_scale
            result[f"{name}_err"] = rel_err(out, reference)
            result[f"{name}_ms"] = cuda_time_ms(run, 10, iters)
            result[f"{name}_tflops"] = flops / result[f"{name}_ms"] / 1e9
            result[f"{name}_amax_s"] = amax_s.item()
            result[f"{name}_amax_o"] = amax_o.item()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                run()
            result[f"{name}_host_us_per_call"] = (time.perf_counter() - start) / 20 * 1e6
            torch.cuda.synchronize()
            try:
                o.zero_()
                cuda_graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    cudnn.set_stream(handle=handle, stream=stream.cuda_stream)
                    with torch.cuda.graph(cuda_graph, stream=stream):
                        run()
                cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
                o.zero_()
                cuda_graph.replay()
                torch.cuda.synchronize()
                result[f"{name}_cuda_graph_err"] = rel_err(o.float() * o_scale, reference)
            except Exception:
                result[f"{name}_cuda_graph_error"] = traceback.format_exc()[-800:]
                cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        except Exception:
            result[f"{name}_error"] = traceback.format_exc()[-1500:]
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn_torch": torch.backends.cudnn.version()}
    try:
        import cudnn

        result["cudnn_frontend"] = cudnn.__version__
        result["cudnn_backend"] = cudnn.backend_version()
        handle = cudnn.create_handle()
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    except Exception:
        result["cudnn_import_error"] = traceback.format_exc()[-1500:]
        print(json.dumps(result, indent=1))
        return
    # FLUX.1-dev 1024x1024; Z-Image 1024x1024 (30 heads); Wan2.2 480x832x81 (40 heads)
    result["shapes"] = [probe(cudnn, handle, 24, 4608, 50), probe(cudnn, handle, 30, 4128, 50),
                        probe(cudnn, handle, 40, 32760, 8)]
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
