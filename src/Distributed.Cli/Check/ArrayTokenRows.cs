namespace Distributed.Cli.Check;

/// <summary>An <see cref="ITokenRows"/> over an in-memory global <c>[B, N, Width]</c> array (tests, small runs).</summary>
internal sealed class ArrayTokenRows : ITokenRows
{
    private readonly float[] _data;

    public ArrayTokenRows(float[] data, int batch, long seqLen, int width)
    {
        ArgumentNullException.ThrowIfNull(data);
        if (batch <= 0 || seqLen <= 0 || width <= 0)
            throw new ArgumentOutOfRangeException(nameof(batch), $"Shape [{batch},{seqLen},{width}] must be positive.");
        if (data.LongLength != batch * seqLen * width)
            throw new ArgumentException($"Expected {batch * seqLen * width} elements for [{batch},{seqLen},{width}], got {data.LongLength}.", nameof(data));
        _data = data;
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
        _data.AsSpan(checked((int)((batch * SeqLen + tokenStart) * Width)), count * Width).CopyTo(destination);
    }
}
