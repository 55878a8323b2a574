using Distributed.Cli.Check;
using Distributed.IO;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>
/// Moves a rank's rows between a source or file and a device tensor in pieces of at most
/// <see cref="PieceFloats"/> floats, through one reused host buffer, so the host never holds a second copy
/// of a shard.
/// </summary>
internal sealed class TensorStreams
{
    /// <summary>Floats moved per piece (4 MiB).</summary>
    public const int PieceFloats = 1 << 20;

    private readonly float[] _buffer = new float[PieceFloats];

    /// <summary>Called with the floats moved by each piece (progress).</summary>
    public Action<long>? Moved { get; init; }

    /// <summary>
    /// Fills <paramref name="tensor"/> (<c>[B, Σcounts, width]</c>, local token order) with the rows of
    /// <paramref name="source"/> (<c>[B, N, width]</c>) that <paramref name="ranges"/> name.
    /// </summary>
    public void Load(ITokenRows source, IReadOnlyList<(int Start, int Count)> ranges, DeviceTensor tensor)
    {
        int width = source.Width;
        long localTokens = ranges.Sum(r => (long)r.Count);
        if (tensor.Length != source.Batch * localTokens * width)
            throw new ArgumentException($"Tensor {tensor} does not hold [B={source.Batch}, {localTokens} tokens, {width}].", nameof(tensor));
        int tokensPerPiece = Math.Max(1, PieceFloats / width);
        var buffer = width <= PieceFloats ? _buffer : new float[width];
        long dst = 0;
        for (int b = 0; b < source.Batch; b++)
            foreach (var (start, count) in ranges)
                for (int t = 0; t < count; t += tokensPerPiece)
                {
                    int n = Math.Min(tokensPerPiece, count - t);
                    var piece = buffer.AsSpan(0, n * width);
                    source.Read(b, start + (long)t, n, piece);
                    tensor.CopyFromHost(piece, dst);
                    dst += piece.Length;
                    Moved?.Invoke(piece.Length);
                }
    }

    /// <summary>
    /// Writes <paramref name="tensor"/>, seen as <c>[outer, Σcounts, inner]</c> in local token order, into
    /// <paramref name="file"/>, seen as <c>[outer, seqLen, inner]</c>, at the rows <paramref name="ranges"/> name.
    /// O <c>[B, Nloc, H·Dv]</c>: outer = B, inner = H·Dv. LSE <c>[B, H, Nloc]</c>: outer = B·H, inner = 1.
    /// </summary>
    public void Store(DeviceTensor tensor, IReadOnlyList<(int Start, int Count)> ranges, long outer, long seqLen, long inner, NpyWriter file)
    {
        long localTokens = ranges.Sum(r => (long)r.Count);
        if (tensor.Length != outer * localTokens * inner)
            throw new ArgumentException($"Tensor {tensor} does not hold [{outer}, {localTokens} tokens, {inner}].", nameof(tensor));
        long tokensPerPiece = Math.Max(1, PieceFloats / inner);
        var buffer = inner <= PieceFloats ? _buffer : new float[inner];
        long src = 0;
        for (long o = 0; o < outer; o++)
            foreach (var (start, count) in ranges)
                for (long t = 0; t < count; t += tokensPerPiece)
                {
                    long n = Math.Min(tokensPerPiece, count - t);
                    var piece = buffer.AsSpan(0, (int)(n * inner));
                    tensor.CopyToHost(piece, src);
                    file.Write((o * seqLen + start + t) * inner, piece);
                    src += piece.Length;
                    Moved?.Invoke(piece.Length);
                }
    }
}
