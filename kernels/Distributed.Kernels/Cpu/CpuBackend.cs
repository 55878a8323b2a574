namespace Distributed.Kernels.Cpu;

/// <summary>
/// The vectorised, multi-threaded CPU backend: the path without a GPU. Tensors are native fp32 memory
/// (<see cref="CpuTensor"/>); operations run on up to <see cref="Threads"/> threads with per-thread
/// scratch of a few tiles reused across calls, so a steady-state step allocates nothing but its task
/// bookkeeping. The softmax forward packs K and V a bounded number of KV heads at a time
/// (<see cref="PackBudgetFloats"/>), never a second copy of the whole of K and V.
/// </summary>
public sealed unsafe partial class CpuBackend : IKernelBackend
{
    /// <summary>Creates the backend.</summary>
    /// <param name="threads">Worker threads; 0 means <see cref="Environment.ProcessorCount"/>.</param>
    public CpuBackend(int threads = 0)
    {
        if (threads < 0) throw new ArgumentOutOfRangeException(nameof(threads), threads, "Use 0 for all cores, or a positive count.");
        Threads = threads == 0 ? Environment.ProcessorCount : threads;
    }

    private readonly PinnedBuffer _keysTransposed = new();

    /// <summary>Worker threads per operation.</summary>
    public int Threads { get; }

    /// <inheritdoc/>
    public string Name => "cpu";

    /// <inheritdoc/>
    public DeviceTensor Allocate(params int[] shape) => new CpuTensor(shape);

    /// <summary>
    /// The most floats the softmax forward packs at once (K transposed and V in 64-key tiles): whole KV
    /// heads up to this budget, at least one. 4M floats = 16 MiB (one head at N = 16K, D = Dv = 64 is 8 MiB).
    /// </summary>
    public const long PackBudgetFloats = 1L << 22;

    /// <summary>The packing budget in floats (tests lower it to exercise several packing passes).</summary>
    internal long PackBudget { get; init; } = PackBudgetFloats;

    /// <inheritdoc/>
    public void Clear(DeviceTensor tensor)
    {
        var t = Cpu(tensor, nameof(tensor));
        NativeBuffer.Clear(t.Pointer, t.Length);
    }

    /// <inheritdoc/>
    public void CopySlice(DeviceTensor source, int srcStart, DeviceTensor destination, int dstStart, int count, int axis)
    {
        var src = Cpu(source, nameof(source));
        var dst = Cpu(destination, nameof(destination));
        if (axis < 0 || axis >= src.Shape.Count || src.Shape.Count != dst.Shape.Count)
            throw new ArgumentOutOfRangeException(nameof(axis), axis, $"axis must name a dimension shared by source {source} and destination {destination}.");
        for (int d = 0; d < src.Shape.Count; d++)
            if (d != axis && src.Shape[d] != dst.Shape[d])
                throw new ArgumentException($"destination {destination} must match source {source} in every dimension but {axis}.", nameof(destination));
        if (count < 0 || srcStart < 0 || dstStart < 0 || srcStart + count > src.Shape[axis] || dstStart + count > dst.Shape[axis])
            throw new ArgumentOutOfRangeException(nameof(count), count, $"Slice [{srcStart}, +{count}) of {source} to [{dstStart}, +{count}) of {destination} along axis {axis} is out of range.");
        long outer = 1, inner = 1;
        for (int d = 0; d < axis; d++) outer *= src.Shape[d];
        for (int d = axis + 1; d < src.Shape.Count; d++) inner *= src.Shape[d];
        float* s = src.Pointer, t = dst.Pointer;
        for (long o = 0; o < outer; o++)
            NativeBuffer.Copy(s + (o * src.Shape[axis] + srcStart) * inner, t + (o * dst.Shape[axis] + dstStart) * inner, count * inner);
    }

    /// <inheritdoc/>
    public DeviceTensor? TryView(DeviceTensor source, int start, int count)
    {
        var src = Cpu(source, nameof(source));
        if (src.Shape.Count < 2 || start < 0 || count < 0 || (long)start + count > src.Shape[1])
            throw new ArgumentOutOfRangeException(nameof(count), count, $"Tokens [{start}, +{count}) are outside axis 1 of {source}.");
        if (src.Shape[0] != 1) return null;
        long inner = 1;
        for (int d = 2; d < src.Shape.Count; d++) inner *= src.Shape[d];
        int[] shape = [.. src.Shape];
        shape[1] = count;
        return new CpuTensor(shape, src.Pointer + start * inner);
    }

    /// <inheritdoc/>
    public void FlashForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o, DeviceTensor lse, in FlashOptions options)
    {
        var x = AttentionDims.FromQkv(q, k, v);
        AttentionDims.Expect(o, nameof(o), x.B, x.Nq, x.H, x.Dv);
        AttentionDims.Expect(lse, nameof(lse), x.B, x.H, x.Nq);
        // The shared Kᵀ buffer makes two concurrent forwards on one backend unsafe; serialise them.
        lock (_keysTransposed)
            CpuFlashAttention.Forward(Cpu(q, nameof(q)), Cpu(k, nameof(k)), Cpu(v, nameof(v)), Cpu(o, nameof(o)), Cpu(lse, nameof(lse)), x, options, Threads, _keysTransposed, PackBudget);
    }

    /// <inheritdoc/>
    public void SoftmaxRowDot(DeviceTensor o, DeviceTensor dO, DeviceTensor drow)
    {
        ArgumentNullException.ThrowIfNull(o);
        if (o.Shape.Count != 4) throw new ArgumentException($"o is {o} but must be [B, N, H, Dv].", nameof(o));
        int b = o.Shape[0], n = o.Shape[1], h = o.Shape[2], dv = o.Shape[3];
        AttentionDims.Expect(dO, nameof(dO), b, n, h, dv);
        AttentionDims.Expect(drow, nameof(drow), b, h, n);
        CpuFlashAttention.RowDot(Cpu(o, nameof(o)), Cpu(dO, nameof(dO)), Cpu(drow, nameof(drow)), b, n, h, dv, Threads);
    }

    /// <inheritdoc/>
    public void FlashBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor lse, DeviceTensor drow, DeviceTensor dO,
        DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, in FlashOptions options)
    {
        var x = AttentionDims.FromQkv(q, k, v);
        AttentionDims.Expect(lse, nameof(lse), x.B, x.H, x.Nq);
        AttentionDims.Expect(drow, nameof(drow), x.B, x.H, x.Nq);
        AttentionDims.Expect(dO, nameof(dO), x.B, x.Nq, x.H, x.Dv);
        AttentionDims.Expect(dQ, nameof(dQ), x.B, x.Nq, x.H, x.D);
        AttentionDims.Expect(dK, nameof(dK), x.B, x.Nk, x.Hk, x.D);
        AttentionDims.Expect(dV, nameof(dV), x.B, x.Nk, x.Hk, x.Dv);
        CpuFlashAttention.Backward(Cpu(q, nameof(q)), Cpu(k, nameof(k)), Cpu(v, nameof(v)), Cpu(lse, nameof(lse)), Cpu(drow, nameof(drow)), Cpu(dO, nameof(dO)),
            Cpu(dQ, nameof(dQ)), Cpu(dK, nameof(dK)), Cpu(dV, nameof(dV)), x, options, Threads);
    }

    /// <inheritdoc/>
    public void MergeSoftmax(DeviceTensor oA, DeviceTensor lseA, DeviceTensor oB, DeviceTensor lseB)
    {
        ArgumentNullException.ThrowIfNull(oA);
        if (oA.Shape.Count != 4) throw new ArgumentException($"oA is {oA} but must be [B, N, H, Dv].", nameof(oA));
        int b = oA.Shape[0], n = oA.Shape[1], h = oA.Shape[2], dv = oA.Shape[3];
        AttentionDims.Expect(oB, nameof(oB), b, n, h, dv);
        AttentionDims.Expect(lseA, nameof(lseA), b, h, n);
        AttentionDims.Expect(lseB, nameof(lseB), b, h, n);
        float* a = Cpu(oA, nameof(oA)).Pointer, la = Cpu(lseA, nameof(lseA)).Pointer;
        float* ob = Cpu(oB, nameof(oB)).Pointer, lb = Cpu(lseB, nameof(lseB)).Pointer;
        for (int bb = 0; bb < b; bb++)
            for (int hh = 0; hh < h; hh++)
                for (int i = 0; i < n; i++)
                {
                    long li = ((long)bb * h + hh) * n + i;
                    float x = la[li], y = lb[li];
                    if (float.IsNegativeInfinity(y)) continue;
                    long off = (((long)bb * n + i) * h + hh) * dv;
                    if (float.IsNegativeInfinity(x))
                    {
                        new ReadOnlySpan<float>(ob + off, dv).CopyTo(new Span<float>(a + off, dv));
                        la[li] = y;
                        continue;
                    }
                    float d = y - x;
                    // sigmoid(d) and log(1 + e^d), both stable for either sign of d.
                    float sig = d >= 0 ? 1f / (1f + MathF.Exp(-d)) : MathF.Exp(d) / (1f + MathF.Exp(d));
                    float softplus = MathF.Max(d, 0f) + MathF.Log(1f + MathF.Exp(-MathF.Abs(d)));
                    for (int e = 0; e < dv; e++) a[off + e] -= sig * (a[off + e] - ob[off + e]);
                    la[li] = x + softplus;
                }
    }

    /// <inheritdoc/>
    public void LightningForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor o, DeviceTensor? sEnd)
    {
        var x = LightningDims(q, k, v, decay);
        AttentionDims.Expect(o, nameof(o), x.B, x.Nq, x.H, x.Dv);
        if (s0 is not null) AttentionDims.Expect(s0, nameof(s0), x.B, x.H, x.D, x.Dv);
        if (sEnd is not null) AttentionDims.Expect(sEnd, nameof(sEnd), x.B, x.H, x.D, x.Dv);
        CpuLightningAttention.Forward(Cpu(q, nameof(q)), Cpu(k, nameof(k)), Cpu(v, nameof(v)), decay.ToArray(), causal,
            s0 is null ? null : Cpu(s0, nameof(s0)), Cpu(o, nameof(o)), sEnd is null ? null : Cpu(sEnd, nameof(sEnd)), x, Threads);
    }

    /// <inheritdoc/>
    public void LightningBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, DeviceTensor? dS0)
    {
        var x = LightningDims(q, k, v, decay);
        if (s0 is not null) AttentionDims.Expect(s0, nameof(s0), x.B, x.H, x.D, x.Dv);
        AttentionDims.Expect(dO, nameof(dO), x.B, x.Nq, x.H, x.Dv);
        if (dSEnd is not null) AttentionDims.Expect(dSEnd, nameof(dSEnd), x.B, x.H, x.D, x.Dv);
        AttentionDims.Expect(dQ, nameof(dQ), x.B, x.Nq, x.H, x.D);
        AttentionDims.Expect(dK, nameof(dK), x.B, x.Nk, x.Hk, x.D);
        AttentionDims.Expect(dV, nameof(dV), x.B, x.Nk, x.Hk, x.Dv);
        if (dS0 is not null) AttentionDims.Expect(dS0, nameof(dS0), x.B, x.H, x.D, x.Dv);
        CpuLightningAttention.Backward(Cpu(q, nameof(q)), Cpu(k, nameof(k)), Cpu(v, nameof(v)), decay.ToArray(), causal,
            s0 is null ? null : Cpu(s0, nameof(s0)), Cpu(dO, nameof(dO)), dSEnd is null ? null : Cpu(dSEnd, nameof(dSEnd)),
            Cpu(dQ, nameof(dQ)), Cpu(dK, nameof(dK)), Cpu(dV, nameof(dV)), dS0 is null ? null : Cpu(dS0, nameof(dS0)), x, Threads);
    }

    /// <inheritdoc/>
    public void LightningChunkState(DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor m)
    {
        ArgumentNullException.ThrowIfNull(m);
        if (m.Shape.Count != 4) throw new ArgumentException($"m is {m} but must be [B, H, D, Dv].", nameof(m));
        int heads = m.Shape[1];
        // The chunk state has H query heads; reuse the Q/K/V checks with a Q-shaped view of the sizes.
        ArgumentNullException.ThrowIfNull(k);
        ArgumentNullException.ThrowIfNull(v);
        if (k.Shape.Count != 4) throw new ArgumentException($"k is {k} but must be [B, N, Hk, D].", nameof(k));
        if (v.Shape.Count != 4 || v.Shape[0] != k.Shape[0] || v.Shape[1] != k.Shape[1] || v.Shape[2] != k.Shape[2])
            throw new ArgumentException($"v is {v} but must be [B, N, Hk, Dv] matching k {k}.", nameof(v));
        int hk = k.Shape[2];
        if (heads % hk != 0) throw new ArgumentException($"m has {heads} heads and k has {hk}; GQA needs H % Hk == 0.", nameof(m));
        var x = new AttentionDims(k.Shape[0], k.Shape[1], k.Shape[1], heads, hk, k.Shape[3], v.Shape[3]);
        AttentionDims.Expect(m, nameof(m), x.B, x.H, x.D, x.Dv);
        AttentionDims.CheckDecay(decay, x.H);
        CpuLightningAttention.ChunkState(Cpu(k, nameof(k)), Cpu(v, nameof(v)), decay.ToArray(), causal, Cpu(m, nameof(m)), x, Threads);
    }

    /// <inheritdoc/>
    public void LightningChunkStateBackward(DeviceTensor q, DeviceTensor dO, ReadOnlySpan<float> decay, bool causal, DeviceTensor dM)
    {
        ArgumentNullException.ThrowIfNull(q);
        if (q.Shape.Count != 4) throw new ArgumentException($"q is {q} but must be [B, N, H, D].", nameof(q));
        int b = q.Shape[0], n = q.Shape[1], h = q.Shape[2], d = q.Shape[3];
        ArgumentNullException.ThrowIfNull(dO);
        if (dO.Shape.Count != 4 || dO.Shape[0] != b || dO.Shape[1] != n || dO.Shape[2] != h)
            throw new ArgumentException($"dO is {dO} but must be [B={b}, N={n}, H={h}, Dv].", nameof(dO));
        int dv = dO.Shape[3];
        AttentionDims.Expect(dM, nameof(dM), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        CpuLightningAttention.ChunkStateBackward(Cpu(q, nameof(q)), Cpu(dO, nameof(dO)), decay.ToArray(), causal, Cpu(dM, nameof(dM)), b, n, h, d, dv, Threads);
    }

    /// <inheritdoc/>
    public void Synchronize() { }

    /// <inheritdoc/>
    public void Dispose()
    {
        lock (_keysTransposed) _keysTransposed.Dispose();
    }

    private static AttentionDims LightningDims(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay)
    {
        var x = AttentionDims.FromQkv(q, k, v);
        if (x.Nk != x.Nq) throw new ArgumentException($"k has {x.Nk} tokens but q has {x.Nq}; lightning attention runs over one chunk of tokens.", nameof(k));
        AttentionDims.CheckDecay(decay, x.H);
        return x;
    }

    private static CpuTensor Cpu(DeviceTensor? t, string name)
    {
        ArgumentNullException.ThrowIfNull(t, name);
        return t as CpuTensor ?? throw new ArgumentException($"{name} belongs to another backend ({t.GetType().Name}); allocate it with this backend.", name);
    }
}
