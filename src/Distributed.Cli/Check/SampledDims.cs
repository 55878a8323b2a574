namespace Distributed.Cli.Check;

/// <summary>
/// Problem sizes of one attention layer for the sampled references: Q <c>[B, N, H, D]</c>, K <c>[B, N, Hk, D]</c>,
/// V <c>[B, N, Hk, Dv]</c>, O and dO <c>[B, N, H, Dv]</c>; query head h reads KV head <c>h / (H / Hk)</c>.
/// </summary>
internal readonly record struct SampledDims(int Batch, long SeqLen, int Heads, int KvHeads, int HeadDim, int ValueDim)
{
    /// <summary>Query heads per KV head.</summary>
    public int Group => Heads / KvHeads;

    /// <summary>The softmax scale actually used: <paramref name="scale"/> when positive, else 1/sqrt(D).</summary>
    public double ScaleOrDefault(double scale) => scale > 0 ? scale : 1.0 / Math.Sqrt(HeadDim);

    /// <summary>Throws unless every size is positive and H is a multiple of Hk.</summary>
    public void Validate()
    {
        if (Batch <= 0 || SeqLen <= 0 || Heads <= 0 || KvHeads <= 0 || HeadDim <= 0 || ValueDim <= 0)
            throw new ArgumentException($"Every size must be positive: {this}.");
        if (Heads % KvHeads != 0) throw new ArgumentException($"Heads {Heads} must be a multiple of KV heads {KvHeads}.");
    }

    /// <summary>Throws unless <paramref name="rows"/> is a <c>[B, N, width]</c> tensor.</summary>
    public void Expect(ITokenRows rows, int width, string name)
    {
        ArgumentNullException.ThrowIfNull(rows, name);
        if (rows.Batch != Batch || rows.SeqLen != SeqLen || rows.Width != width)
            throw new ArgumentException($"{name} is [{rows.Batch},{rows.SeqLen},{rows.Width}]; expected [{Batch},{SeqLen},{width}].", name);
    }

    /// <summary>
    /// The checks every reference starts with: sizes valid, q <c>[B, N, H·D]</c>, k <c>[B, N, Hk·D]</c>,
    /// v <c>[B, N, Hk·Dv]</c>, dO (when given) <c>[B, N, H·Dv]</c>, and a positive block size.
    /// </summary>
    public void ExpectInputs(ITokenRows q, ITokenRows k, ITokenRows v, ITokenRows? dO, int blockTokens)
    {
        Validate();
        Expect(q, Heads * HeadDim, nameof(q));
        Expect(k, KvHeads * HeadDim, nameof(k));
        Expect(v, KvHeads * ValueDim, nameof(v));
        if (dO is not null) Expect(dO, Heads * ValueDim, nameof(dO));
        ArgumentOutOfRangeException.ThrowIfLessThan(blockTokens, 1);
    }

    /// <summary>Throws unless <paramref name="values"/> is a <c>[B, H, N]</c> row statistic.</summary>
    public void Expect(IRowValues values, string name)
    {
        ArgumentNullException.ThrowIfNull(values, name);
        if (values.Batch != Batch || values.Heads != Heads || values.SeqLen != SeqLen)
            throw new ArgumentException($"{name} is [{values.Batch},{values.Heads},{values.SeqLen}]; expected [{Batch},{Heads},{SeqLen}].", name);
    }
}
