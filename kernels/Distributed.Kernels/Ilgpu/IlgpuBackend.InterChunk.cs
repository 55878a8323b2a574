using ILGPU;
using ILGPU.Runtime;

namespace Distributed.Kernels.Ilgpu;

/// <summary>
/// The inter-chunk lightning operations of the ILGPU backend, added in place to results computed with
/// S0 = 0 and dS_end = 0: <c>o_i += λ^(i+1) q_i S0</c>, <c>dq_i += λ^(i+1) dO_i S0ᵀ</c>,
/// <c>dk_j += λ^(N−1−j) dS_end v_j</c>, <c>dv_j += λ^(N−1−j) dS_endᵀ k_j</c> (λ = 1 when not causal). They
/// are the state terms of the tiled lightning kernels (<see cref="LightningKernels"/>) with the whole chunk
/// as one block, no intra-block term, and accumulation on.
/// </summary>
public sealed partial class IlgpuBackend
{
    private static LightningParams InterChunkParams(int b, int n, int h, int hk, int d, int dv, bool causal) => new()
    {
        B = b, N = n, H = h, Hk = hk, D = d, Dv = dv, Bs = n, T = 1, Causal = causal ? 1 : 0, Intra = 0, Accumulate = 1,
    };

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
        CheckLightningHeadDims(d, nameof(q), dv, nameof(o));
        var qv = View(q);
        var sv = View(s0);
        var ov = View(o);
        if (n == 0) return;
        var ln = UploadLnDecay(decay);
        // Intra = 0: the key and value arguments are not read.
        _output(RowTiles(b * h, n), qv, qv, qv, ln, sv, ov, InterChunkParams(b, n, h, h, d, dv, causal));
        AfterLaunch();
    }

    /// <inheritdoc/>
    public void LightningInterChunkBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        var x = LightningDims(q, k, v);
        AttentionDims.CheckDecay(decay, x.H);
        x.ExpectLightningGradients(s0, dO, dSEnd, dQ, dK, dV);
        if (x.Nq == 0) return;
        var p = InterChunkParams(x.B, x.Nq, x.H, x.Hk, x.D, x.Dv, causal);
        var ln = UploadLnDecay(decay);
        if (s0 is not null)
        {
            _gradQ(RowTiles(x.B * x.H, x.Nq), View(k), View(v), View(dO), ln, View(s0), View(dQ), p);
            AfterLaunch();
        }
        if (dSEnd is not null)
        {
            _gradKV(RowTiles(x.B * x.Hk, x.Nq), View(q), View(k), View(v), View(dO), ln, View(dSEnd), View(dK), View(dV), p);
            AfterLaunch();
        }
    }
}
