namespace Distributed.Kernels.Cpu;

/// <summary>The inter-chunk lightning operations of the CPU backend (see <see cref="CpuLightningInterChunk"/>).</summary>
public sealed unsafe partial class CpuBackend
{
    /// <inheritdoc/>
    public void LightningInterChunkForward(DeviceTensor q, ReadOnlySpan<float> decay, bool causal, DeviceTensor s0, DeviceTensor o)
    {
        var (b, n, h, d) = QueryDims(q);
        ArgumentNullException.ThrowIfNull(o);
        if (o.Shape.Count != 4) throw new ArgumentException($"o is {o} but must be [B={b}, N={n}, H={h}, Dv].", nameof(o));
        int dv = o.Shape[3];
        AttentionDims.Expect(o, nameof(o), b, n, h, dv);
        AttentionDims.Expect(s0, nameof(s0), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        if (n == 0) return;
        CpuLightningInterChunk.Forward(Cpu(q, nameof(q)), DecayArray(decay), causal, Cpu(s0, nameof(s0)), Cpu(o, nameof(o)), b, n, h, d, dv, Threads);
    }

    /// <inheritdoc/>
    public void LightningInterChunkBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        var x = LightningDims(q, k, v, decay);
        x.ExpectLightningGradients(s0, dO, dSEnd, dQ, dK, dV);
        if (x.Nq == 0) return;
        CpuLightningInterChunk.Backward(Cpu(k, nameof(k)), Cpu(v, nameof(v)), DecayArray(decay), causal, s0 is null ? null : Cpu(s0, nameof(s0)),
            Cpu(dO, nameof(dO)), dSEnd is null ? null : Cpu(dSEnd, nameof(dSEnd)), Cpu(dQ, nameof(dQ)), Cpu(dK, nameof(dK)), Cpu(dV, nameof(dV)), x, Threads);
    }

    private static (int B, int N, int H, int D) QueryDims(DeviceTensor q)
    {
        ArgumentNullException.ThrowIfNull(q);
        if (q.Shape.Count != 4) throw new ArgumentException($"q is {q} but must be 4-D [B, N, H, D].", nameof(q));
        return (q.Shape[0], q.Shape[1], q.Shape[2], q.Shape[3]);
    }
}
