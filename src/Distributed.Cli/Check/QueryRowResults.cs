namespace Distributed.Cli.Check;

/// <summary>
/// Exact fp64 outputs at sampled query rows, in the order of <see cref="Rows"/>: <see cref="O"/> <c>[R, H·Dv]</c>,
/// <see cref="DQ"/> <c>[R, H·D]</c> (null without dO), and for softmax <see cref="Lse"/> and <see cref="Drow"/>
/// <c>[R, H]</c> (null for lightning; Drow null without dO). Row r's slice is the layout of the global tensor's row.
/// </summary>
internal sealed record QueryRowResults(IReadOnlyList<TokenRow> Rows, int Heads, int HeadDim, int ValueDim,
    double[] O, double[]? Lse, double[]? Drow, double[]? DQ)
{
    /// <summary>O of row r, <c>[H·Dv]</c>.</summary>
    public ReadOnlySpan<double> ORow(int r) => O.AsSpan(r * Heads * ValueDim, Heads * ValueDim);

    /// <summary>dQ of row r, <c>[H·D]</c>.</summary>
    public ReadOnlySpan<double> DQRow(int r) =>
        (DQ ?? throw new InvalidOperationException("dQ was not computed (no dO was given).")).AsSpan(r * Heads * HeadDim, Heads * HeadDim);
}
