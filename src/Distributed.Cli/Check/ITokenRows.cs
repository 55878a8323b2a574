namespace Distributed.Cli.Check;

/// <summary>
/// Read access to the rows of a global row-major <c>[Batch, SeqLen, Width]</c> fp32 tensor (Width = heads·dim),
/// at any token range, so a sampled reference can stream a tensor in blocks without ever holding all of it.
/// </summary>
internal interface ITokenRows
{
    /// <summary>Batch size B.</summary>
    int Batch { get; }

    /// <summary>Global sequence length N.</summary>
    long SeqLen { get; }

    /// <summary>Elements per token row (heads·dim).</summary>
    int Width { get; }

    /// <summary>
    /// Copies tokens <c>[tokenStart, tokenStart + count)</c> of batch <paramref name="batch"/> into
    /// <paramref name="destination"/> (<c>count·Width</c> elements, token-major).
    /// </summary>
    void Read(int batch, long tokenStart, int count, Span<float> destination);
}
