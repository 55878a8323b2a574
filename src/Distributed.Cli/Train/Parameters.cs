namespace Distributed.Cli.Train;

/// <summary>
/// Every weight of the model in one flat array, with its gradient beside it, so the gradients of a step are
/// all-reduced with one collective and AdamW runs one loop. A tensor is an offset and a length into both.
/// </summary>
internal sealed class Parameters
{
    private readonly List<Tensor> _tensors = [];
    private int _length;

    /// <summary>One named weight tensor: <c>Values[Offset .. Offset + Length)</c>; decayed by AdamW when <paramref name="Decayed"/>.</summary>
    public sealed record Tensor(string Name, int Offset, int Length, bool Decayed);

    /// <summary>The weights (after <see cref="Build"/>).</summary>
    public float[] Values { get; private set; } = [];

    /// <summary>Their gradients, same layout.</summary>
    public float[] Gradients { get; private set; } = [];

    /// <summary>The tensors in the order they were added.</summary>
    public IReadOnlyList<Tensor> Tensors => _tensors;

    /// <summary>Reserves a tensor; <see cref="Build"/> then allocates every tensor at once.</summary>
    public Tensor Add(string name, int length, bool decayed)
    {
        var t = new Tensor(name, _length, length, decayed);
        _tensors.Add(t);
        _length += length;
        return t;
    }

    /// <summary>Allocates the weights and gradients.</summary>
    public void Build()
    {
        Values = new float[_length];
        Gradients = new float[_length];
    }

    /// <summary>Fills a tensor with N(0, std²) from <paramref name="rng"/>.</summary>
    public void Normal(Tensor t, double std, ref SplitMix64 rng)
    {
        for (int i = 0; i < t.Length; i++) Values[t.Offset + i] = (float)(std * rng.NextNormal());
    }

    /// <summary>Fills a tensor with one value.</summary>
    public void Fill(Tensor t, float value) => Values.AsSpan(t.Offset, t.Length).Fill(value);
}
