using System.Buffers;
using Distributed.Cli.Run;

namespace Distributed.Cli.Check;

/// <summary>
/// The CLI's deterministic synthetic inputs as an <see cref="ITokenRows"/>: element <c>[b, t, c]</c> is
/// <c>amplitude · SyntheticInputs.Value(seed, tensorId, (b·N + t)·Width + c)</c>, computed on demand for any
/// token range (so any rank reads any rows without the others).
/// </summary>
internal sealed class SyntheticTokenRows : ITokenRows
{
    private readonly ulong _seed;
    private readonly int _tensorId;
    private readonly float _amplitude;

    public SyntheticTokenRows(ulong seed, int tensorId, int batch, long seqLen, int width, float amplitude)
    {
        if (batch <= 0 || seqLen <= 0 || width <= 0)
            throw new ArgumentOutOfRangeException(nameof(batch), $"Shape [{batch},{seqLen},{width}] must be positive.");
        _seed = seed;
        _tensorId = tensorId;
        _amplitude = amplitude;
        Batch = batch;
        SeqLen = seqLen;
        Width = width;
    }

    public int Batch { get; }
    public long SeqLen { get; }
    public int Width { get; }

    public void Read(int batch, long tokenStart, int count, Span<float> destination)
    {
        TokenRowsAccess.CheckRead(this, batch, tokenStart, count, destination.Length);
        long globalBase = (batch * SeqLen + tokenStart) * Width;
        int n = count * Width;
        if (n < ParallelElements)
        {
            Generate(globalBase, destination[..n]);
            return;
        }
        // Hashing dominates a streamed pass at millions of tokens: spread large reads over the cores.
        var buffer = ArrayPool<float>.Shared.Rent(n);
        try
        {
            int chunks = (n + ParallelElements - 1) / ParallelElements;
            Parallel.For(0, chunks, c =>
            {
                int start = c * ParallelElements, length = Math.Min(ParallelElements, n - start);
                Generate(globalBase + start, buffer.AsSpan(start, length));
            });
            buffer.AsSpan(0, n).CopyTo(destination);
        }
        finally
        {
            ArrayPool<float>.Shared.Return(buffer);
        }
    }

    private const int ParallelElements = 1 << 14;

    private void Generate(long globalIndex, Span<float> destination)
    {
        for (int i = 0; i < destination.Length; i++) destination[i] = _amplitude * SyntheticInputs.Value(_seed, _tensorId, globalIndex + i);
    }
}
