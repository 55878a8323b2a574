namespace Distributed.Cli.Check;

/// <summary>Helpers and argument checks shared by the <see cref="ITokenRows"/> and <see cref="IRowValues"/> implementations.</summary>
internal static class TokenRowsAccess
{
    public static void CheckRead(ITokenRows rows, int batch, long tokenStart, int count, int destinationLength)
    {
        if ((uint)batch >= (uint)rows.Batch) throw new ArgumentOutOfRangeException(nameof(batch), $"Batch {batch} is outside [0, {rows.Batch}).");
        if (count < 0 || tokenStart < 0 || tokenStart + count > rows.SeqLen)
            throw new ArgumentOutOfRangeException(nameof(tokenStart), $"Tokens [{tokenStart}, {tokenStart + count}) are outside [0, {rows.SeqLen}).");
        if (destinationLength < (long)count * rows.Width)
            throw new ArgumentException($"The destination holds {destinationLength} elements; {(long)count * rows.Width} are needed.", nameof(destinationLength));
    }

    public static void CheckRead(IRowValues values, int batch, int head, long tokenStart, int count, int destinationLength)
    {
        if ((uint)batch >= (uint)values.Batch) throw new ArgumentOutOfRangeException(nameof(batch), $"Batch {batch} is outside [0, {values.Batch}).");
        if ((uint)head >= (uint)values.Heads) throw new ArgumentOutOfRangeException(nameof(head), $"Head {head} is outside [0, {values.Heads}).");
        if (count < 0 || tokenStart < 0 || tokenStart + count > values.SeqLen)
            throw new ArgumentOutOfRangeException(nameof(tokenStart), $"Tokens [{tokenStart}, {tokenStart + count}) are outside [0, {values.SeqLen}).");
        if (destinationLength < count)
            throw new ArgumentException($"The destination holds {destinationLength} elements; {count} are needed.", nameof(destinationLength));
    }

    /// <summary>The given tokens' rows of batch b, widened to fp64, <c>[tokens, Width]</c>.</summary>
    public static double[] ReadRows(ITokenRows source, int b, long[] tokens)
    {
        int w = source.Width;
        var result = new double[(long)tokens.Length * w];
        var row = new float[w];
        for (int r = 0; r < tokens.Length; r++)
        {
            source.Read(b, tokens[r], 1, row);
            VectorMath.Widen(row, result.AsSpan(r * w, w));
        }
        return result;
    }
}
