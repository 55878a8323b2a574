using Distributed.Cli.Run;

namespace Distributed.Cli.Check;

/// <summary>TEMPORARY stand-in until the check branch lands.</summary>
internal sealed class SyntheticTokenRows(ulong seed, int tensor, int batch, long seqLen, int width, float amplitude) : ITokenRows
{
    public int Batch => batch;
    public long SeqLen => seqLen;
    public int Width => width;
    public void Read(int b, long tokenStart, int count, Span<float> destination)
    {
        long baseIndex = (b * seqLen + tokenStart) * width;
        for (int i = 0; i < destination.Length; i++) destination[i] = amplitude * SyntheticInputs.Value(seed, tensor, baseIndex + i);
    }
}
