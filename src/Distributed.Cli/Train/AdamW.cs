namespace Distributed.Cli.Train;

/// <summary>
/// AdamW (Loshchilov and Hutter 2019): <c>m ← β1·m + (1−β1)·g</c>, <c>v ← β2·v + (1−β2)·g²</c>,
/// <c>w ← w − lr·(m̂ / (sqrt(v̂) + ε) + λ·w)</c> with bias-corrected m̂, v̂; the weight decay λ applies to the
/// tensors marked decayed (the matrices), not to gains.
/// </summary>
internal sealed class AdamW(Parameters parameters, float beta1 = 0.9f, float beta2 = 0.99f, float epsilon = 1e-8f, float weightDecay = 0.01f)
{
    private readonly float[] _m = new float[parameters.Values.Length];
    private readonly float[] _v = new float[parameters.Values.Length];
    private int _step;

    /// <summary>One update with learning rate <paramref name="lr"/> from the gradients in <see cref="Parameters.Gradients"/>.</summary>
    public void Step(float lr)
    {
        _step++;
        float c1 = 1f - MathF.Pow(beta1, _step), c2 = 1f - MathF.Pow(beta2, _step);
        var w = parameters.Values;
        var g = parameters.Gradients;
        foreach (var t in parameters.Tensors)
        {
            float decay = t.Decayed ? weightDecay : 0f;
            for (int i = t.Offset; i < t.Offset + t.Length; i++)
            {
                _m[i] = beta1 * _m[i] + (1f - beta1) * g[i];
                _v[i] = beta2 * _v[i] + (1f - beta2) * g[i] * g[i];
                w[i] -= lr * (_m[i] / c1 / (MathF.Sqrt(_v[i] / c2) + epsilon) + decay * w[i]);
            }
        }
    }
}
