namespace Distributed.Cli.Check;

/// <summary>An <see cref="IRowValues"/> over an in-memory <c>[B, H, N]</c> array, fp32 (a run's LSE) or fp64.</summary>
internal sealed class ArrayRowValues : IRowValues
{
    private readonly float[]? _single;
    private readonly double[]? _double;

    public ArrayRowValues(float[] values, int batch, int heads, long seqLen)
        : this(batch, heads, seqLen, values?.LongLength ?? throw new ArgumentNullException(nameof(values))) => _single = values;

    public ArrayRowValues(double[] values, int batch, int heads, long seqLen)
        : this(batch, heads, seqLen, values?.LongLength ?? throw new ArgumentNullException(nameof(values))) => _double = values;

    private ArrayRowValues(int batch, int heads, long seqLen, long length)
    {
        if (batch <= 0 || heads <= 0 || seqLen <= 0)
            throw new ArgumentOutOfRangeException(nameof(batch), $"Shape [{batch},{heads},{seqLen}] must be positive.");
        if (length != batch * heads * seqLen)
            throw new ArgumentException($"Expected {batch * heads * seqLen} values for [{batch},{heads},{seqLen}], got {length}.", nameof(length));
        Batch = batch;
        Heads = heads;
        SeqLen = seqLen;
    }

    public int Batch { get; }
    public int Heads { get; }
    public long SeqLen { get; }

    public void Read(int batch, int head, long tokenStart, int count, Span<double> destination)
    {
        TokenRowsAccess.CheckRead(this, batch, head, tokenStart, count, destination.Length);
        int start = checked((int)(((long)batch * Heads + head) * SeqLen + tokenStart));
        if (_double is not null)
        {
            _double.AsSpan(start, count).CopyTo(destination);
            return;
        }
        var src = _single!.AsSpan(start, count);
        for (int i = 0; i < count; i++) destination[i] = src[i];
    }
}
