namespace Distributed.Cli.Check;

/// <summary>
/// Exact fp64 key-side gradients at sampled key rows, in the order of <see cref="Rows"/>:
/// <see cref="DK"/> <c>[R, Hk·D]</c> and <see cref="DV"/> <c>[R, Hk·Dv]</c> (GQA: summed over each KV head's query heads).
/// </summary>
internal sealed record KeyRowResults(IReadOnlyList<TokenRow> Rows, int KvHeads, int HeadDim, int ValueDim, double[] DK, double[] DV)
{
    /// <summary>dK of row r, <c>[Hk·D]</c>.</summary>
    public ReadOnlySpan<double> DKRow(int r) => DK.AsSpan(r * KvHeads * HeadDim, KvHeads * HeadDim);

    /// <summary>dV of row r, <c>[Hk·Dv]</c>.</summary>
    public ReadOnlySpan<double> DVRow(int r) => DV.AsSpan(r * KvHeads * ValueDim, KvHeads * ValueDim);
}
