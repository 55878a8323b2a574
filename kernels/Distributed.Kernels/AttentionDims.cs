namespace Distributed.Kernels;

/// <summary>
/// The dimensions of one block operation, read from its tensors and checked once, so every backend
/// validates the same way and reports the parameter that is wrong together with the fix.
/// </summary>
/// <param name="B">Batch.</param>
/// <param name="Nq">Query rows.</param>
/// <param name="Nk">Key rows.</param>
/// <param name="H">Query heads.</param>
/// <param name="Hk">Key/value heads (GQA: H % Hk == 0).</param>
/// <param name="D">Head dim of Q and K.</param>
/// <param name="Dv">Head dim of V.</param>
public readonly record struct AttentionDims(int B, int Nq, int Nk, int H, int Hk, int D, int Dv)
{
    /// <summary>Query heads per KV head.</summary>
    public int Group => H / Hk;

    /// <summary>Reads and checks Q <c>[B,Nq,H,D]</c>, K <c>[B,Nk,Hk,D]</c>, V <c>[B,Nk,Hk,Dv]</c>.</summary>
    /// <exception cref="ArgumentException">A shape does not fit; ParamName names the tensor.</exception>
    public static AttentionDims FromQkv(DeviceTensor q, DeviceTensor k, DeviceTensor v)
    {
        Rank4(q, nameof(q), "[B, Nq, H, D]");
        Rank4(k, nameof(k), "[B, Nk, Hk, D]");
        Rank4(v, nameof(v), "[B, Nk, Hk, Dv]");
        int b = q.Shape[0], nq = q.Shape[1], h = q.Shape[2], d = q.Shape[3];
        int nk = k.Shape[1], hk = k.Shape[2];
        if (k.Shape[0] != b) throw new ArgumentException($"k has batch {k.Shape[0]} but q has {b}.", nameof(k));
        if (k.Shape[3] != d) throw new ArgumentException($"k has head dim {k.Shape[3]} but q has {d}; Q and K must share D.", nameof(k));
        if (hk < 1 || h % hk != 0) throw new ArgumentException($"q has {h} heads and k has {hk}; GQA needs H % Hk == 0 (e.g. Hk = 1, 2 or {h}).", nameof(k));
        if (v.Shape[0] != b || v.Shape[1] != nk || v.Shape[2] != hk)
            throw new ArgumentException($"v is {v} but must be [B={b}, Nk={nk}, Hk={hk}, Dv] to match k {k}.", nameof(v));
        return new AttentionDims(b, nq, nk, h, hk, d, v.Shape[3]);
    }

    /// <summary>Checks that <paramref name="t"/> has exactly <paramref name="shape"/>.</summary>
    /// <exception cref="ArgumentException">It does not; ParamName is <paramref name="name"/>.</exception>
    public static void Expect(DeviceTensor? t, string name, params int[] shape)
    {
        ArgumentNullException.ThrowIfNull(t, name);
        ArgumentNullException.ThrowIfNull(shape);
        if (t.Shape.Count != shape.Length || !t.Shape.SequenceEqual(shape))
            throw new ArgumentException($"{name} is {t} but must be [{string.Join(",", shape)}].", name);
    }

    /// <summary>
    /// Checks the tensors of a lightning backward against these dimensions: S0 and dS_end (when given)
    /// <c>[B,H,D,Dv]</c>, dO <c>[B,Nq,H,Dv]</c>, dQ <c>[B,Nq,H,D]</c>, dK <c>[B,Nk,Hk,D]</c>, dV <c>[B,Nk,Hk,Dv]</c>.
    /// </summary>
    /// <exception cref="ArgumentException">A shape does not fit; ParamName names the tensor.</exception>
    public void ExpectLightningGradients(DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        if (s0 is not null) Expect(s0, nameof(s0), B, H, D, Dv);
        Expect(dO, nameof(dO), B, Nq, H, Dv);
        if (dSEnd is not null) Expect(dSEnd, nameof(dSEnd), B, H, D, Dv);
        Expect(dQ, nameof(dQ), B, Nq, H, D);
        Expect(dK, nameof(dK), B, Nk, Hk, D);
        Expect(dV, nameof(dV), B, Nk, Hk, Dv);
    }

    /// <summary>Checks the per-head decay: H values in (0, 1].</summary>
    /// <exception cref="ArgumentException">Wrong count or a value outside (0, 1].</exception>
    public static void CheckDecay(ReadOnlySpan<float> decay, int heads)
    {
        if (decay.Length != heads)
            throw new ArgumentException($"decay has {decay.Length} values but there are {heads} heads; pass one λ per head (1 = no decay).", nameof(decay));
        foreach (float l in decay)
            if (!(l > 0f && l <= 1f))
                throw new ArgumentException($"decay value {l} is outside (0, 1]; λ = 1 means no decay.", nameof(decay));
    }

    private static void Rank4(DeviceTensor t, string name, string layout)
    {
        ArgumentNullException.ThrowIfNull(t, name);
        if (t.Shape.Count != 4) throw new ArgumentException($"{name} is {t} but must be 4-D {layout}.", name);
    }
}
