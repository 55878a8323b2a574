namespace Distributed.Cli.Check;

/// <summary>One global row: batch index and global token position.</summary>
internal readonly record struct TokenRow(int Batch, long Token)
{
    /// <summary>
    /// The indices of <paramref name="rows"/> grouped by batch (ascending), each group ordered by token
    /// (ties by index). Throws when a row is outside <paramref name="dims"/>.
    /// </summary>
    public static List<(int Batch, int[] Order)> GroupByBatch(IReadOnlyList<TokenRow> rows, SampledDims dims)
    {
        ArgumentNullException.ThrowIfNull(rows);
        for (int r = 0; r < rows.Count; r++)
        {
            var row = rows[r];
            if ((uint)row.Batch >= (uint)dims.Batch || row.Token < 0 || row.Token >= dims.SeqLen)
                throw new ArgumentOutOfRangeException(nameof(rows), $"Row {r} {row} is outside batch [0, {dims.Batch}) × tokens [0, {dims.SeqLen}).");
        }
        return Enumerable.Range(0, rows.Count)
            .GroupBy(r => rows[r].Batch)
            .OrderBy(g => g.Key)
            .Select(g => (g.Key, g.OrderBy(r => rows[r].Token).ThenBy(r => r).ToArray()))
            .ToList();
    }
}
