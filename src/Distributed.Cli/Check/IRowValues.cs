namespace Distributed.Cli.Check;

/// <summary>
/// Read access to a global per-row statistic <c>[Batch, Heads, SeqLen]</c> (the softmax LSE or Drow of a run),
/// a contiguous run of tokens of one (batch, head) at a time.
/// </summary>
internal interface IRowValues
{
    /// <summary>Batch size B.</summary>
    int Batch { get; }

    /// <summary>Query heads H.</summary>
    int Heads { get; }

    /// <summary>Global sequence length N.</summary>
    long SeqLen { get; }

    /// <summary>Copies values <c>[batch, head, tokenStart .. tokenStart + count)</c> into <paramref name="destination"/>.</summary>
    void Read(int batch, int head, long tokenStart, int count, Span<double> destination);
}
