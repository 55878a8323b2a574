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
    private readonly PinnedBuffer _backwardPack = new();
    private readonly PinnedBuffer _lightningPartials = new();

    /// <summary>The instruction sets <see cref="UseIsa"/> accepts, fastest first.</summary>
    public static IReadOnlyList<string> IsaNames { get; } = ["avx512", "avx2", "scalar"];

    /// <summary>
    /// The vector path every CPU backend of this process runs now: "avx512", "avx2" or "scalar" (the best
    /// the hardware has unless <see cref="UseIsa"/> chose a lower one).
    /// </summary>
    public static string Isa => CpuMath.PathName;

    /// <summary>
    /// Chooses the vector path process-wide (for benchmarks and tests of the lower paths): "avx512",
    /// "avx2", "scalar", or "auto" for the best the hardware has. Not safe while kernels run.
    /// </summary>
    /// <exception cref="ArgumentException">An unknown name, or a path the hardware lacks.</exception>
    public static void UseIsa(string isa)
    {
        ArgumentNullException.ThrowIfNull(isa);
        bool has512 = System.Runtime.Intrinsics.Vector512.IsHardwareAccelerated, has256 = System.Runtime.Intrinsics.Vector256.IsHardwareAccelerated;
        (bool v512, bool v256) = isa switch
        {
            "auto" => (has512, has256),
            "avx512" when has512 => (true, true),
            "avx2" when has256 => (false, true),
            "scalar" => (false, false),
            "avx512" or "avx2" => throw new ArgumentException($"This CPU has no {isa} (it has {(has512 ? "avx512" : has256 ? "avx2" : "neither avx2 nor avx512")}); choose a lower path or auto.", nameof(isa)),
            _ => throw new ArgumentException($"Unknown instruction set '{isa}'; use auto, {string.Join(", ", IsaNames)}.", nameof(isa)),
        };
        (CpuMath.UseVector512, CpuMath.UseVector256) = (v512, v256);
    }

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
        CpuRowOps.CopyRuns(src.Pointer + srcStart * inner, (long)src.Shape[axis] * inner, dst.Pointer + dstStart * inner, (long)dst.Shape[axis] * inner, outer, count * inner, Threads);
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
        CpuRowOps.RowDot(Cpu(o, nameof(o)).Pointer, Cpu(dO, nameof(dO)).Pointer, Cpu(drow, nameof(drow)).Pointer, b, n, h, dv, Threads);
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
        // The packed operands live in one buffer per backend; serialise concurrent backwards on it.
        lock (_backwardPack)
            CpuFlashBackward.Backward(Cpu(q, nameof(q)), Cpu(k, nameof(k)), Cpu(v, nameof(v)), Cpu(lse, nameof(lse)), Cpu(drow, nameof(drow)), Cpu(dO, nameof(dO)),
                Cpu(dQ, nameof(dQ)), Cpu(dK, nameof(dK)), Cpu(dV, nameof(dV)), x, options, Threads, _backwardPack);
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
        CpuRowOps.MergeSoftmax(Cpu(oA, nameof(oA)).Pointer, Cpu(lseA, nameof(lseA)).Pointer, Cpu(oB, nameof(oB)).Pointer, Cpu(lseB, nameof(lseB)).Pointer, b, n, h, dv, Threads);
    }

    /// <inheritdoc/>
    public void LightningForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor o, DeviceTensor? sEnd)
    {
        var x = LightningDims(q, k, v, decay);
        AttentionDims.Expect(o, nameof(o), x.B, x.Nq, x.H, x.Dv);
        if (s0 is not null) AttentionDims.Expect(s0, nameof(s0), x.B, x.H, x.D, x.Dv);
        if (sEnd is not null) AttentionDims.Expect(sEnd, nameof(sEnd), x.B, x.H, x.D, x.Dv);
        CpuLightningAttention.Forward(Cpu(q, nameof(q)), Cpu(k, nameof(k)), Cpu(v, nameof(v)), DecayArray(decay), causal,
            s0 is null ? null : Cpu(s0, nameof(s0)), Cpu(o, nameof(o)), sEnd is null ? null : Cpu(sEnd, nameof(sEnd)), x, Threads);
    }

    /// <inheritdoc/>
    public void LightningBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, DeviceTensor? dS0)
    {
        var x = LightningDims(q, k, v, decay);
        x.ExpectLightningGradients(s0, dO, dSEnd, dQ, dK, dV);
        if (dS0 is not null) AttentionDims.Expect(dS0, nameof(dS0), x.B, x.H, x.D, x.Dv);
        // The GQA partials live in one buffer per backend; serialise concurrent backwards on it.
        lock (_lightningPartials)
            CpuLightningAttention.Backward(Cpu(q, nameof(q)), Cpu(k, nameof(k)), Cpu(v, nameof(v)), DecayArray(decay), causal,
                s0 is null ? null : Cpu(s0, nameof(s0)), Cpu(dO, nameof(dO)), dSEnd is null ? null : Cpu(dSEnd, nameof(dSEnd)),
                Cpu(dQ, nameof(dQ)), Cpu(dK, nameof(dK)), Cpu(dV, nameof(dV)), dS0 is null ? null : Cpu(dS0, nameof(dS0)), x, Threads, _lightningPartials);
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
        CpuLightningAttention.ChunkState(Cpu(k, nameof(k)), Cpu(v, nameof(v)), DecayArray(decay), causal, Cpu(m, nameof(m)), x, Threads);
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
        CpuLightningAttention.ChunkStateBackward(Cpu(q, nameof(q)), Cpu(dO, nameof(dO)), DecayArray(decay), causal, Cpu(dM, nameof(dM)), b, n, h, d, dv, Threads);
    }

    // Per-thread copy of the decays for the kernels' worker lambdas (a span cannot be captured), so no
    // call allocates: the calling thread waits inside the kernel, and nothing else writes its copy meanwhile.
    [ThreadStatic] private static float[]? _decayCopy;

    internal static float[] DecayArray(ReadOnlySpan<float> decay)
    {
        if (_decayCopy is null || _decayCopy.Length < decay.Length) _decayCopy = new float[Math.Max(decay.Length, 64)];
        decay.CopyTo(_decayCopy);
        return _decayCopy;
    }

    /// <inheritdoc/>
    public void Synchronize() { }

    /// <inheritdoc/>
    public void Dispose()
    {
        lock (_keysTransposed) _keysTransposed.Dispose();
        lock (_backwardPack) _backwardPack.Dispose();
        lock (_lightningPartials) _lightningPartials.Dispose();
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
