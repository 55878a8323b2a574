using Distributed.Kernels;

namespace Distributed.Reference;

/// <summary>
/// A tensor of <see cref="ReferenceBackend"/>: a plain fp32 host array, row-major.
/// </summary>
public sealed class HostTensor : DeviceTensor
{
    /// <summary>Allocates a zero-filled tensor of <paramref name="shape"/>.</summary>
    public HostTensor(params int[] shape) : base(shape)
    {
        if (Length > Array.MaxLength) throw new ArgumentOutOfRangeException(nameof(shape), $"Tensor [{string.Join(",", shape)}] has {Length} elements; the reference holds at most {Array.MaxLength}.");
        Data = new float[Length];
    }

    /// <summary>The elements, row-major.</summary>
    public float[] Data { get; }

    /// <inheritdoc/>
    public override void CopyFromHost(ReadOnlySpan<float> source, long offset = 0)
    {
        CheckRange(source.Length, offset, nameof(source));
        source.CopyTo(Data.AsSpan((int)offset));
    }

    /// <inheritdoc/>
    public override void CopyToHost(Span<float> destination, long offset = 0)
    {
        CheckRange(destination.Length, offset, nameof(destination));
        Data.AsSpan((int)offset, destination.Length).CopyTo(destination);
    }

    private void CheckRange(int count, long offset, string name)
    {
        if (offset < 0 || offset + count > Length)
            throw new ArgumentOutOfRangeException(name, $"Elements [{offset}, {offset + count}) do not fit in tensor {this} of {Length} elements; pass a shorter span or a smaller offset.");
    }

    internal double[] ToDouble()
    {
        var d = new double[Data.Length];
        for (int i = 0; i < d.Length; i++) d[i] = Data[i];
        return d;
    }

    internal void Store(double[] values, bool accumulate = false)
    {
        if (accumulate)
            for (int i = 0; i < values.Length; i++) Data[i] = (float)(Data[i] + values[i]);
        else
            for (int i = 0; i < values.Length; i++) Data[i] = (float)values[i];
    }
}

/// <summary>
/// An <see cref="IKernelBackend"/> that computes every operation with the fp64 <see cref="ReferenceAttention"/>
/// and stores the result as fp32. Slow (O(N²) everything, single thread) but obviously right: it stands in for a
/// real backend when testing the parallel schemes, and its validation follows the same rules as the real ones.
/// </summary>
public sealed class ReferenceBackend : IKernelBackend
{
    /// <inheritdoc/>
    public string Name => "reference";

    /// <inheritdoc/>
    public DeviceTensor Allocate(params int[] shape) => new HostTensor(shape);

    /// <inheritdoc/>
    public void Clear(DeviceTensor tensor) => Array.Clear(Host(tensor, nameof(tensor)).Data);

    /// <inheritdoc/>
    public void CopySlice(DeviceTensor source, int srcStart, DeviceTensor destination, int dstStart, int count, int axis)
    {
        var src = Host(source, nameof(source));
        var dst = Host(destination, nameof(destination));
        if (src.Shape.Count != dst.Shape.Count)
            throw new ArgumentException($"destination {destination} must have the rank of source {source}.", nameof(destination));
        if (axis < 0 || axis >= src.Shape.Count)
            throw new ArgumentOutOfRangeException(nameof(axis), axis, $"axis must be in [0, {src.Shape.Count}) for {source}.");
        for (int d = 0; d < src.Shape.Count; d++)
            if (d != axis && src.Shape[d] != dst.Shape[d])
                throw new ArgumentException($"destination {destination} must match source {source} in every dimension but axis {axis}.", nameof(destination));
        if (count < 0) throw new ArgumentOutOfRangeException(nameof(count), count, "count must be non-negative.");
        if (srcStart < 0 || srcStart + count > src.Shape[axis])
            throw new ArgumentOutOfRangeException(nameof(srcStart), srcStart, $"[{srcStart}, {srcStart + count}) is outside axis {axis} of source {source}.");
        if (dstStart < 0 || dstStart + count > dst.Shape[axis])
            throw new ArgumentOutOfRangeException(nameof(dstStart), dstStart, $"[{dstStart}, {dstStart + count}) is outside axis {axis} of destination {destination}.");
        long outer = 1, inner = 1;
        for (int d = 0; d < axis; d++) outer *= src.Shape[d];
        for (int d = axis + 1; d < src.Shape.Count; d++) inner *= src.Shape[d];
        // Copied through a temporary so a slice of a tensor onto itself behaves like two tensors.
        var tmp = new float[outer * count * inner];
        for (long o = 0; o < outer; o++)
            Array.Copy(src.Data, (o * src.Shape[axis] + srcStart) * inner, tmp, o * count * inner, count * inner);
        for (long o = 0; o < outer; o++)
            Array.Copy(tmp, o * count * inner, dst.Data, (o * dst.Shape[axis] + dstStart) * inner, count * inner);
    }

    /// <inheritdoc/>
    public void FlashForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o, DeviceTensor lse, in FlashOptions options)
    {
        var (hq, hk, hv) = Qkv(q, k, v, out var x);
        Expect(o, nameof(o), x.B, x.Nq, x.H, x.Dv);
        Expect(lse, nameof(lse), x.B, x.H, x.Nq);
        var (ro, rl) = ReferenceAttention.FlashForward(hq.ToDouble(), hk.ToDouble(), hv.ToDouble(), x,
            options.QueryOffset, options.KeyOffset, options.Causal, options.ScaleFor(x.D));
        Host(o, nameof(o)).Store(ro);
        Host(lse, nameof(lse)).Store(rl);
    }

    /// <inheritdoc/>
    public void SoftmaxRowDot(DeviceTensor o, DeviceTensor dO, DeviceTensor drow)
    {
        var ho = Host(o, nameof(o));
        if (o.Shape.Count != 4) throw new ArgumentException($"o is {o} but must be 4-D [B, N, H, Dv].", nameof(o));
        int b = o.Shape[0], n = o.Shape[1], h = o.Shape[2], dv = o.Shape[3];
        Expect(dO, nameof(dO), b, n, h, dv);
        Expect(drow, nameof(drow), b, h, n);
        var hd = Host(dO, nameof(dO));
        var r = new double[(long)b * h * n];
        for (int bb = 0; bb < b; bb++)
            for (int i = 0; i < n; i++)
                for (int hh = 0; hh < h; hh++)
                {
                    double acc = 0;
                    long at = (((long)bb * n + i) * h + hh) * dv;
                    for (int e = 0; e < dv; e++) acc += (double)ho.Data[at + e] * hd.Data[at + e];
                    r[((long)bb * h + hh) * n + i] = acc;
                }
        Host(drow, nameof(drow)).Store(r);
    }

    /// <inheritdoc/>
    public void FlashBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor lse, DeviceTensor drow, DeviceTensor dO,
        DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, in FlashOptions options)
    {
        var (hq, hk, hv) = Qkv(q, k, v, out var x);
        Expect(lse, nameof(lse), x.B, x.H, x.Nq);
        Expect(drow, nameof(drow), x.B, x.H, x.Nq);
        Expect(dO, nameof(dO), x.B, x.Nq, x.H, x.Dv);
        Expect(dQ, nameof(dQ), x.B, x.Nq, x.H, x.D);
        Expect(dK, nameof(dK), x.B, x.Nk, x.Hk, x.D);
        Expect(dV, nameof(dV), x.B, x.Nk, x.Hk, x.Dv);
        var (rq, rk, rv) = ReferenceAttention.FlashBackwardFromRowStats(hq.ToDouble(), hk.ToDouble(), hv.ToDouble(),
            Host(lse, nameof(lse)).ToDouble(), Host(drow, nameof(drow)).ToDouble(), Host(dO, nameof(dO)).ToDouble(), x,
            options.QueryOffset, options.KeyOffset, options.Causal, options.ScaleFor(x.D));
        Host(dQ, nameof(dQ)).Store(rq, options.Accumulate);
        Host(dK, nameof(dK)).Store(rk, options.Accumulate);
        Host(dV, nameof(dV)).Store(rv, options.Accumulate);
    }

    /// <inheritdoc/>
    public void MergeSoftmax(DeviceTensor oA, DeviceTensor lseA, DeviceTensor oB, DeviceTensor lseB)
    {
        var ha = Host(oA, nameof(oA));
        if (oA.Shape.Count != 4) throw new ArgumentException($"oA is {oA} but must be 4-D [B, N, H, Dv].", nameof(oA));
        int b = oA.Shape[0], n = oA.Shape[1], h = oA.Shape[2], dv = oA.Shape[3];
        Expect(lseA, nameof(lseA), b, h, n);
        Expect(oB, nameof(oB), b, n, h, dv);
        Expect(lseB, nameof(lseB), b, h, n);
        var hla = Host(lseA, nameof(lseA));
        var (ro, rl) = ReferenceAttention.MergeSoftmax(ha.ToDouble(), hla.ToDouble(), Host(oB, nameof(oB)).ToDouble(),
            Host(lseB, nameof(lseB)).ToDouble(), b, n, h, dv);
        ha.Store(ro);
        hla.Store(rl);
    }

    /// <inheritdoc/>
    public void LightningForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor o, DeviceTensor? sEnd)
    {
        var (hq, hk, hv) = Chunk(q, k, v, decay, out var x, out var lam);
        if (s0 is not null) Expect(s0, nameof(s0), x.B, x.H, x.D, x.Dv);
        Expect(o, nameof(o), x.B, x.Nq, x.H, x.Dv);
        if (sEnd is not null) Expect(sEnd, nameof(sEnd), x.B, x.H, x.D, x.Dv);
        var (ro, rs) = ReferenceAttention.LightningForward(hq.ToDouble(), hk.ToDouble(), hv.ToDouble(), lam, causal,
            s0 is null ? null : Host(s0, nameof(s0)).ToDouble(), x);
        Host(o, nameof(o)).Store(ro);
        if (sEnd is not null) Host(sEnd, nameof(sEnd)).Store(rs);
    }

    /// <inheritdoc/>
    public void LightningBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, DeviceTensor? dS0)
    {
        var (hq, hk, hv) = Chunk(q, k, v, decay, out var x, out var lam);
        if (s0 is not null) Expect(s0, nameof(s0), x.B, x.H, x.D, x.Dv);
        Expect(dO, nameof(dO), x.B, x.Nq, x.H, x.Dv);
        if (dSEnd is not null) Expect(dSEnd, nameof(dSEnd), x.B, x.H, x.D, x.Dv);
        Expect(dQ, nameof(dQ), x.B, x.Nq, x.H, x.D);
        Expect(dK, nameof(dK), x.B, x.Nk, x.Hk, x.D);
        Expect(dV, nameof(dV), x.B, x.Nk, x.Hk, x.Dv);
        if (dS0 is not null) Expect(dS0, nameof(dS0), x.B, x.H, x.D, x.Dv);
        var (rq, rk, rv, rs) = ReferenceAttention.LightningBackward(hq.ToDouble(), hk.ToDouble(), hv.ToDouble(), lam, causal,
            s0 is null ? null : Host(s0, nameof(s0)).ToDouble(), Host(dO, nameof(dO)).ToDouble(),
            dSEnd is null ? null : Host(dSEnd, nameof(dSEnd)).ToDouble(), x);
        Host(dQ, nameof(dQ)).Store(rq);
        Host(dK, nameof(dK)).Store(rk);
        Host(dV, nameof(dV)).Store(rv);
        if (dS0 is not null) Host(dS0, nameof(dS0)).Store(rs);
    }

    /// <inheritdoc/>
    public void LightningChunkState(DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor m)
    {
        var hk = Host(k, nameof(k));
        var hv = Host(v, nameof(v));
        if (k.Shape.Count != 4) throw new ArgumentException($"k is {k} but must be 4-D [B, N, Hk, D].", nameof(k));
        if (v.Shape.Count != 4 || v.Shape[0] != k.Shape[0] || v.Shape[1] != k.Shape[1] || v.Shape[2] != k.Shape[2])
            throw new ArgumentException($"v is {v} but must be [B, N, Hk, Dv] to match k {k}.", nameof(v));
        var hm = Host(m, nameof(m));
        if (m.Shape.Count != 4) throw new ArgumentException($"m is {m} but must be 4-D [B, H, D, Dv].", nameof(m));
        int b = k.Shape[0], n = k.Shape[1], hkv = k.Shape[2], d = k.Shape[3], dv = v.Shape[3], h = m.Shape[1];
        if (hkv < 1 || h % hkv != 0) throw new ArgumentException($"m has {h} heads and k has {hkv}; GQA needs H % Hk == 0.", nameof(m));
        Expect(m, nameof(m), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        var x = new ReferenceAttention.Dims(b, n, n, h, hkv, d, dv);
        hm.Store(ReferenceAttention.ChunkState(hk.ToDouble(), hv.ToDouble(), ToDouble(decay), causal, x));
    }

    /// <inheritdoc/>
    public void LightningChunkStateBackward(DeviceTensor q, DeviceTensor dO, ReadOnlySpan<float> decay, bool causal, DeviceTensor dM)
    {
        var hq = Host(q, nameof(q));
        if (q.Shape.Count != 4) throw new ArgumentException($"q is {q} but must be 4-D [B, N, H, D].", nameof(q));
        var hd = Host(dO, nameof(dO));
        if (dO.Shape.Count != 4 || dO.Shape[0] != q.Shape[0] || dO.Shape[1] != q.Shape[1] || dO.Shape[2] != q.Shape[2])
            throw new ArgumentException($"dO is {dO} but must be [B, N, H, Dv] to match q {q}.", nameof(dO));
        int b = q.Shape[0], n = q.Shape[1], h = q.Shape[2], d = q.Shape[3], dv = dO.Shape[3];
        Expect(dM, nameof(dM), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        var x = new ReferenceAttention.Dims(b, n, n, h, h, d, dv);
        Host(dM, nameof(dM)).Store(ReferenceAttention.ChunkStateBackward(hq.ToDouble(), hd.ToDouble(), ToDouble(decay), causal, x));
    }

    /// <inheritdoc/>
    public void LightningInterChunkForward(DeviceTensor q, ReadOnlySpan<float> decay, bool causal, DeviceTensor s0, DeviceTensor o)
    {
        var hq = Host(q, nameof(q));
        if (q.Shape.Count != 4) throw new ArgumentException($"q is {q} but must be 4-D [B, N, H, D].", nameof(q));
        int b = q.Shape[0], n = q.Shape[1], h = q.Shape[2], d = q.Shape[3];
        var ho = Host(o, nameof(o));
        if (o.Shape.Count != 4) throw new ArgumentException($"o is {o} but must be [B, N, H, Dv].", nameof(o));
        int dv = o.Shape[3];
        Expect(o, nameof(o), b, n, h, dv);
        Expect(s0, nameof(s0), b, h, d, dv);
        AttentionDims.CheckDecay(decay, h);
        double[] rq = hq.ToDouble(), rs = Host(s0, nameof(s0)).ToDouble(), ro = ho.ToDouble(), lam = ToDouble(decay);
        for (int bb = 0; bb < b; bb++)
            for (int i = 0; i < n; i++)
                for (int hh = 0; hh < h; hh++)
                {
                    double w = causal ? Math.Pow(lam[hh], i + 1) : 1.0;
                    for (int c = 0; c < dv; c++)
                    {
                        double s = 0;
                        for (int x = 0; x < d; x++) s += rq[((long)(bb * n + i) * h + hh) * d + x] * rs[((long)(bb * h + hh) * d + x) * dv + c];
                        ro[((long)(bb * n + i) * h + hh) * dv + c] += w * s;
                    }
                }
        ho.Store(ro);
    }

    /// <inheritdoc/>
    public void LightningInterChunkBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        var (_, hk, hv) = Chunk(q, k, v, decay, out var x, out var lam);
        if (s0 is not null) Expect(s0, nameof(s0), x.B, x.H, x.D, x.Dv);
        Expect(dO, nameof(dO), x.B, x.Nq, x.H, x.Dv);
        if (dSEnd is not null) Expect(dSEnd, nameof(dSEnd), x.B, x.H, x.D, x.Dv);
        Expect(dQ, nameof(dQ), x.B, x.Nq, x.H, x.D);
        Expect(dK, nameof(dK), x.B, x.Nk, x.Hk, x.D);
        Expect(dV, nameof(dV), x.B, x.Nk, x.Hk, x.Dv);
        int n = x.Nq, heads = x.H, kvHeads = x.Hk, d = x.D, dv = x.Dv, group = heads / kvHeads;
        double Weight(int h, int power) => causal ? Math.Pow(lam[h], power) : 1.0;
        if (s0 is not null)
        {
            double[] g = Host(dO, nameof(dO)).ToDouble(), s = Host(s0, nameof(s0)).ToDouble(), rq = Host(dQ, nameof(dQ)).ToDouble();
            for (int b = 0; b < x.B; b++)
                for (int i = 0; i < n; i++)
                    for (int h = 0; h < heads; h++)
                        for (int c = 0; c < d; c++)
                        {
                            double sum = 0;
                            for (int e = 0; e < dv; e++) sum += g[((long)(b * n + i) * heads + h) * dv + e] * s[((long)(b * heads + h) * d + c) * dv + e];
                            rq[((long)(b * n + i) * heads + h) * d + c] += Weight(h, i + 1) * sum;
                        }
            Host(dQ, nameof(dQ)).Store(rq);
        }
        if (dSEnd is not null)
        {
            double[] es = Host(dSEnd, nameof(dSEnd)).ToDouble(), kk = hk.ToDouble(), vv = hv.ToDouble();
            double[] rk = Host(dK, nameof(dK)).ToDouble(), rv = Host(dV, nameof(dV)).ToDouble();
            for (int b = 0; b < x.B; b++)
                for (int j = 0; j < n; j++)
                    for (int h = 0; h < heads; h++)
                    {
                        int kh = h / group;
                        double w = Weight(h, n - 1 - j);
                        long row = (long)(b * n + j) * kvHeads + kh, state = (long)(b * heads + h) * d * dv;
                        for (int c = 0; c < d; c++)
                        {
                            double sum = 0;
                            for (int e = 0; e < dv; e++) sum += es[state + (long)c * dv + e] * vv[row * dv + e];
                            rk[row * d + c] += w * sum;
                        }
                        for (int e = 0; e < dv; e++)
                        {
                            double sum = 0;
                            for (int c = 0; c < d; c++) sum += es[state + (long)c * dv + e] * kk[row * d + c];
                            rv[row * dv + e] += w * sum;
                        }
                    }
            Host(dK, nameof(dK)).Store(rk);
            Host(dV, nameof(dV)).Store(rv);
        }
    }

    /// <inheritdoc/>
    public void Synchronize() { }

    /// <inheritdoc/>
    public void Dispose() { }

    private static HostTensor Host(DeviceTensor? t, string name)
    {
        ArgumentNullException.ThrowIfNull(t, name);
        return t as HostTensor
            ?? throw new ArgumentException($"{name} is a {t.GetType().Name}, not a tensor of the reference backend; allocate it with ReferenceBackend.Allocate.", name);
    }

    private static void Expect(DeviceTensor? t, string name, params int[] shape)
    {
        Host(t, name);
        AttentionDims.Expect(t, name, shape);
    }

    private static (HostTensor Q, HostTensor K, HostTensor V) Qkv(DeviceTensor q, DeviceTensor k, DeviceTensor v, out ReferenceAttention.Dims x)
    {
        var r = (Host(q, nameof(q)), Host(k, nameof(k)), Host(v, nameof(v)));
        var a = AttentionDims.FromQkv(q, k, v);
        x = new ReferenceAttention.Dims(a.B, a.Nq, a.Nk, a.H, a.Hk, a.D, a.Dv);
        return r;
    }

    private static (HostTensor Q, HostTensor K, HostTensor V) Chunk(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay,
        out ReferenceAttention.Dims x, out double[] lambda)
    {
        var r = Qkv(q, k, v, out x);
        if (x.Nk != x.Nq)
            throw new ArgumentException($"k has {x.Nk} tokens but q has {x.Nq}; a lightning chunk uses the same tokens for Q, K and V.", nameof(k));
        AttentionDims.CheckDecay(decay, x.H);
        lambda = ToDouble(decay);
        return r;
    }

    private static double[] ToDouble(ReadOnlySpan<float> a)
    {
        var d = new double[a.Length];
        for (int i = 0; i < a.Length; i++) d[i] = a[i];
        return d;
    }
}
