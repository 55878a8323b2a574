using ILGPU;
using ILGPU.Runtime;

namespace Distributed.Kernels.Ilgpu;

/// <summary>The inter-chunk lightning operations of the ILGPU backend (see <see cref="LightningInterChunkKernels"/>);
/// the kernels load on first use.</summary>
public sealed partial class IlgpuBackend
{
    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, InterChunkParams>? _interForward, _interGradQ, _interGradK, _interGradV;

    private Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, InterChunkParams> InterKernel(
        ref Action<KernelConfig, ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, InterChunkParams>? slot,
        Action<ArrayView<float>, ArrayView<float>, ArrayView<float>, ArrayView<float>, InterChunkParams> kernel)
        => slot ??= _accelerator.LoadStreamKernel(kernel);

    /// <inheritdoc/>
    public void LightningInterChunkForward(DeviceTensor q, ReadOnlySpan<float> decay, bool causal, DeviceTensor s0, DeviceTensor o)
    {
        ArgumentNullException.ThrowIfNull(q);
        if (q.Shape.Count != 4) throw new ArgumentException($"q is {q} but must be 4-D [B, N, H, D].", nameof(q));
        int b = q.Shape[0], n = q.Shape[1], h = q.Shape[2], d = q.Shape[3];
        ArgumentNullException.ThrowIfNull(o);
        if (o.Shape.Count != 4) throw new ArgumentException($"o is {o} but must be [B={b}, N={n}, H={h}, Dv].", nameof(o));
        int dv = o.Shape[3];
        AttentionDims.Expect(o, nameof(o), b, n, h, dv);
        AttentionDims.Expect(s0, nameof(s0), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        var p = new InterChunkParams { B = b, N = n, H = h, Hk = h, D = d, Dv = dv, Causal = causal ? 1 : 0 };
        var qv = View(q);
        var sv = View(s0);
        var ov = View(o);
        if (n == 0) return;
        var ln = UploadLnDecay(decay);
        InterKernel(ref _interForward, LightningInterChunkKernels.Forward)(Elementwise((long)b * n * h * dv), qv, sv, ov, ln, p);
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void LightningInterChunkBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        var x = LightningDims(q, k, v);
        AttentionDims.CheckDecay(decay, x.H);
        if (s0 is not null) AttentionDims.Expect(s0, nameof(s0), x.B, x.H, x.D, x.Dv);
        AttentionDims.Expect(dO, nameof(dO), x.B, x.Nq, x.H, x.Dv);
        if (dSEnd is not null) AttentionDims.Expect(dSEnd, nameof(dSEnd), x.B, x.H, x.D, x.Dv);
        AttentionDims.Expect(dQ, nameof(dQ), x.B, x.Nq, x.H, x.D);
        AttentionDims.Expect(dK, nameof(dK), x.B, x.Nk, x.Hk, x.D);
        AttentionDims.Expect(dV, nameof(dV), x.B, x.Nk, x.Hk, x.Dv);
        if (x.Nq == 0) return;
        var p = new InterChunkParams { B = x.B, N = x.Nq, H = x.H, Hk = x.Hk, D = x.D, Dv = x.Dv, Causal = causal ? 1 : 0 };
        var ln = UploadLnDecay(decay);
        if (s0 is not null)
        {
            InterKernel(ref _interGradQ, LightningInterChunkKernels.GradQ)(Elementwise((long)x.B * x.Nq * x.H * x.D), View(dO), View(s0), View(dQ), ln, p);
            AfterLaunch();
        }
        if (dSEnd is not null)
        {
            InterKernel(ref _interGradK, LightningInterChunkKernels.GradK)(Elementwise((long)x.B * x.Nk * x.Hk * x.D), View(v), View(dSEnd), View(dK), ln, p);
            AfterLaunch();
            InterKernel(ref _interGradV, LightningInterChunkKernels.GradV)(Elementwise((long)x.B * x.Nk * x.Hk * x.Dv), View(k), View(dSEnd), View(dV), ln, p);
            AfterLaunch();
        }
    }
}
