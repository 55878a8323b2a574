namespace Distributed.Cli.Check;

/// <summary>TEMPORARY stand-in until the check branch lands: rows of a global [B, N, Width] tensor.</summary>
internal interface ITokenRows
{
    int Batch { get; }
    long SeqLen { get; }
    int Width { get; }
    void Read(int batch, long tokenStart, int count, Span<float> destination);
}
