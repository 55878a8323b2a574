namespace Distributed.Cli.Check;

/// <summary>
/// A row a rank checks: batch, global token, and <see cref="LocalToken"/>, the token's position within the
/// concatenation of the rank's token ranges (its index along N of the local <c>[B, Nloc, ...]</c> tensors).
/// </summary>
internal readonly record struct SampledRow(int Batch, long Token, int LocalToken)
{
    /// <summary>The global row, as the sampled references take it.</summary>
    public TokenRow Row => new(Batch, Token);

    /// <summary>Index of this row among the <c>B·Nloc</c> rows of a local tensor: <c>Batch·Nloc + LocalToken</c>.</summary>
    public long LocalRowIndex(int localTokens) => (long)Batch * localTokens + LocalToken;
}
