using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Train;

/// <summary>The model's sizes and how its attention layers are split.</summary>
/// <param name="Dim">d, the residual width (= Heads · head dim).</param>
/// <param name="Heads">H, attention heads of every layer.</param>
/// <param name="Layers">L; layer 0, 2, 4, … are lightning attention, 1, 3, … softmax attention.</param>
/// <param name="Vocabulary">V, tokens.</param>
/// <param name="Batch">B, sequences per step.</param>
/// <param name="SeqLen">N, tokens per sequence (global).</param>
/// <param name="SoftmaxScheme">How softmax layers are split.</param>
/// <param name="LightningScheme">How lightning layers are split.</param>
/// <param name="Layout">The token layout of every layer (the per-token parts need one layout for all).</param>
internal sealed record ModelConfig(int Dim, int Heads, int Layers, int Vocabulary, int Batch, int SeqLen,
    ParallelScheme SoftmaxScheme, ParallelScheme LightningScheme, ShardLayout Layout)
{
    public int HeadDim => Dim / Heads;

    public static bool IsLightning(int layer) => layer % 2 == 0;
}

/// <summary>The summed loss, the answers and the correct answers of one forward on this rank's rows.</summary>
internal readonly record struct LocalLoss(double LossSum, int Answers, int Correct);

/// <summary>
/// A small hybrid language model, split over ranks by sequence: token embedding; L pre-norm residual layers
/// that alternate lightning attention (with TransNormerLLM decay, its output RMS-normalised per head, as
/// TransNormerLLM normalises it) and causal softmax attention, each <c>x ← x + Wo·Attn(Wq·h, Wk·h, Wv·h)</c> with
/// <c>h = RMSNorm(x)</c>; a final RMSNorm, an output head and cross-entropy on the answer positions.
/// Every part but attention is per token, so it runs on this rank's rows only; the attention layers are the
/// distributed <see cref="SequenceParallelAttention"/>. Backward is written out by hand for every part and
/// leaves this rank's share of every weight gradient in <see cref="Parameters.Gradients"/>; the caller sums
/// them over ranks.
/// </summary>
/// <remarks>Activations are <c>[B, Nloc, d]</c>, rows in this rank's local token order.</remarks>
internal sealed class HybridModel : IDisposable
{
    private readonly ModelConfig _c;
    private readonly HostMath _math;
    private readonly LayerAttention[] _attention;
    private readonly Parameters.Tensor _embedding, _finalGain, _head;
    private readonly LayerWeights[] _weights;
    private readonly int _rows;
    // Saved forward activations, per layer: the layer input, its normalised input, q, k, v, attention output, normalised output.
    private readonly float[][] _x, _h, _q, _k, _v, _o, _u, _invIn, _invOut;
    private readonly float[] _dx, _du, _dO, _dq, _dk, _dv, _dh;
    private int[] _tokens = [], _bound = [], _answerRows = [], _answerTargets = [];
    private readonly float[] _finalIn;
    private float[] _answerInput = [], _finalNorm = [], _finalInv = [], _logits = [];

    private sealed record LayerWeights(Parameters.Tensor Gain, Parameters.Tensor Wq, Parameters.Tensor Wk, Parameters.Tensor Wv, Parameters.Tensor Wo);

    public HybridModel(ICommunicator communicator, IKernelBackend backend, HostMath math, ModelConfig config, ulong seed)
    {
        if (config.Dim % config.Heads != 0) throw new ArgumentException($"--dim {config.Dim} must be a multiple of --heads {config.Heads}.", nameof(config));
        _c = config;
        _math = math;
        int d = config.Dim;
        Parameters = new Parameters();
        _embedding = Parameters.Add("embedding", config.Vocabulary * d, decayed: false);
        _weights = new LayerWeights[config.Layers];
        for (int l = 0; l < config.Layers; l++)
            _weights[l] = new LayerWeights(Parameters.Add($"layer{l}.gain", d, false), Parameters.Add($"layer{l}.wq", d * d, true),
                Parameters.Add($"layer{l}.wk", d * d, true), Parameters.Add($"layer{l}.wv", d * d, true), Parameters.Add($"layer{l}.wo", d * d, true));
        _finalGain = Parameters.Add("final.gain", d, false);
        _head = Parameters.Add("head", d * config.Vocabulary, true);
        Parameters.Build();
        var rng = new SplitMix64(SplitMix64.Mix(seed, 0x5eed));
        Parameters.Normal(_embedding, 1.0, ref rng);
        foreach (var w in _weights)
        {
            Parameters.Fill(w.Gain, 1f);
            Parameters.Normal(w.Wq, 1 / Math.Sqrt(d), ref rng);
            Parameters.Normal(w.Wk, 1 / Math.Sqrt(d), ref rng);
            Parameters.Normal(w.Wv, 1 / Math.Sqrt(d), ref rng);
            Parameters.Normal(w.Wo, 0.5 / Math.Sqrt(d), ref rng);
        }
        Parameters.Fill(_finalGain, 1f);
        Parameters.Normal(_head, 1 / Math.Sqrt(d), ref rng);

        var shape = new AttentionShape(config.Batch, config.SeqLen, config.Heads, config.Heads, config.HeadDim, config.HeadDim);
        _attention = new LayerAttention[config.Layers];
        try
        {
            for (int l = 0; l < config.Layers; l++)
            {
                var options = ModelConfig.IsLightning(l)
                    ? new SequenceParallelOptions { Attention = AttentionKind.Lightning, Scheme = config.LightningScheme, Layout = config.Layout, Decay = Decay(config.Heads) }
                    : new SequenceParallelOptions { Attention = AttentionKind.Softmax, Scheme = config.SoftmaxScheme, Layout = config.Layout };
                _attention[l] = new LayerAttention(communicator, backend, shape, options);
                if (!_attention[l].LocalTokenRanges.SequenceEqual(_attention[0].LocalTokenRanges))
                    throw new ArgumentException($"Layer {l} ({options.Scheme}) owns other tokens than layer 0; every layer must use the same layout.", nameof(config));
            }
        }
        catch
        {
            foreach (var a in _attention) a?.Dispose();
            throw;
        }
        LocalTokens = _attention[0].LocalTokenRanges.Sum(r => r.Count);
        _rows = config.Batch * LocalTokens;
        int n = _rows * d;
        float[][] PerLayer(int length) => Enumerable.Range(0, config.Layers).Select(_ => new float[length]).ToArray();
        _x = PerLayer(n);
        _h = PerLayer(n);
        _q = PerLayer(n);
        _k = PerLayer(n);
        _v = PerLayer(n);
        _o = PerLayer(n);
        _u = PerLayer(n);
        _invIn = PerLayer(_rows);
        _invOut = PerLayer(_rows * config.Heads);
        _dx = new float[n];
        _du = new float[n];
        _dO = new float[n];
        _dq = new float[n];
        _dk = new float[n];
        _dv = new float[n];
        _dh = new float[n];
        _finalIn = new float[n];
    }

    /// <summary>
    /// The lightning layers' per-head decay: <c>1 − λ_h</c> spaced geometrically from 0.7 (head 0 sees mostly the
    /// current and previous token) to 0.01 (the last head remembers ~100 tokens). TransNormerLLM's slopes
    /// (<see cref="SequenceParallelAttention.DefaultDecay"/>) start at λ = 0.78 for 4 heads; the recall task learns
    /// much sooner with one sharply local head, which carries each key into the position of its value.
    /// </summary>
    public static float[] Decay(int heads) =>
        [.. Enumerable.Range(0, heads).Select(h => (float)(1 - 0.7 * Math.Pow(0.01 / 0.7, heads == 1 ? 0 : h / (double)(heads - 1))))];

    /// <summary>Every weight and its gradient.</summary>
    public Parameters Parameters { get; }

    /// <summary>The global token ranges of this rank (every layer's), in local order.</summary>
    public IReadOnlyList<(int Start, int Count)> LocalTokenRanges => _attention[0].LocalTokenRanges;

    /// <summary>Nloc, tokens per sequence on this rank.</summary>
    public int LocalTokens { get; }

    /// <summary>
    /// Forward over this rank's rows: tokens, bound tokens and targets <c>[B, Nloc]</c>. A position's input is the
    /// sum of the embeddings of its token and of its bound token (−1: none); a target of −1 means no loss there. Returns the
    /// summed cross-entropy (natural log) over the answer rows, their count, and how many the argmax got right.
    /// Collective (the attention layers).
    /// </summary>
    public LocalLoss Forward(int[] tokens, int[] bound, int[] targets)
    {
        int d = _c.Dim, v = _c.Vocabulary;
        if (tokens.Length != _rows || bound.Length != _rows || targets.Length != _rows)
            throw new ArgumentException($"tokens, bound and targets must hold B·Nloc = {_rows} local positions.", nameof(tokens));
        _tokens = tokens;
        _bound = bound;
        var x0 = _x[0];
        for (int r = 0; r < _rows; r++)
        {
            Parameters.Values.AsSpan(_embedding.Offset + tokens[r] * d, d).CopyTo(x0.AsSpan(r * d, d));
            if (bound[r] >= 0) HostMath.Axpy(1f, Parameters.Values.AsSpan(_embedding.Offset + bound[r] * d, d), x0.AsSpan(r * d, d));
        }
        for (int l = 0; l < _c.Layers; l++)
        {
            var w = _weights[l];
            var p = Parameters.Values;
            RmsNorm.Forward(_x[l], _rows, d, p, w.Gain.Offset, _h[l], _invIn[l]);
            _math.MatMul(_h[l], _rows, d, p, w.Wq.Offset, d, _q[l]);
            _math.MatMul(_h[l], _rows, d, p, w.Wk.Offset, d, _k[l]);
            _math.MatMul(_h[l], _rows, d, p, w.Wv.Offset, d, _v[l]);
            _attention[l].Forward(_q[l], _k[l], _v[l], _o[l]);
            float[] u = _o[l];
            if (ModelConfig.IsLightning(l))
            {
                RmsNorm.Forward(_o[l], _rows * _c.Heads, _c.HeadDim, null, 0, _u[l], _invOut[l]);
                u = _u[l];
            }
            var next = l + 1 < _c.Layers ? _x[l + 1] : _finalIn;
            _math.MatMul(u, _rows, d, p, w.Wo.Offset, d, next);
            HostMath.Axpy(1f, _x[l], next);
        }
        // The head runs on the answer rows only: the loss lives there.
        _answerRows = Enumerable.Range(0, _rows).Where(r => targets[r] >= 0).ToArray();
        _answerTargets = _answerRows.Select(r => targets[r]).ToArray();
        int a = _answerRows.Length;
        var xa = new float[a * d];
        for (int i = 0; i < a; i++) _finalIn.AsSpan(_answerRows[i] * d, d).CopyTo(xa.AsSpan(i * d, d));
        _finalNorm = new float[a * d];
        _finalInv = new float[a];
        RmsNorm.Forward(xa, a, d, Parameters.Values, _finalGain.Offset, _finalNorm, _finalInv);
        _answerInput = xa;
        _logits = new float[a * v];
        _math.MatMul(_finalNorm, a, d, Parameters.Values, _head.Offset, v, _logits);
        double loss = 0;
        int correct = 0;
        for (int i = 0; i < a; i++)
        {
            var z = _logits.AsSpan(i * v, v);
            float max = float.NegativeInfinity;
            int best = 0;
            for (int j = 0; j < v; j++)
                if (z[j] > max) { max = z[j]; best = j; }
            double sum = 0;
            for (int j = 0; j < v; j++) sum += Math.Exp(z[j] - max);
            loss += Math.Log(sum) + max - z[_answerTargets[i]];
            if (best == _answerTargets[i]) correct++;
        }
        return new LocalLoss(loss, a, correct);
    }

    /// <summary>
    /// Backward of the last <see cref="Forward"/> for the loss <c>scale · Σ cross-entropy</c> (scale = 1 / the
    /// answers over all ranks, for the mean): overwrites <see cref="Parameters.Gradients"/> with this rank's
    /// share. Collective (the attention layers).
    /// </summary>
    public void Backward(float scale)
    {
        int d = _c.Dim, v = _c.Vocabulary, a = _answerRows.Length;
        var p = Parameters.Values;
        var g = Parameters.Gradients;
        Array.Clear(g);
        // Cross-entropy: dz = scale · (softmax(z) − onehot).
        var dz = new float[a * v];
        for (int i = 0; i < a; i++)
        {
            var z = _logits.AsSpan(i * v, v);
            float max = float.NegativeInfinity;
            foreach (float zj in z) max = Math.Max(max, zj);
            double sum = 0;
            foreach (float zj in z) sum += Math.Exp(zj - max);
            for (int j = 0; j < v; j++) dz[i * v + j] = (float)(Math.Exp(z[j] - max) / sum) * scale;
            dz[i * v + _answerTargets[i]] -= scale;
        }
        _math.AddMatMulTransposedA(_finalNorm, a, d, dz, v, g, _head.Offset);
        var dNorm = new float[a * d];
        _math.MatMulTransposedB(dz, a, v, p, _head.Offset, d, dNorm, accumulate: false);
        var dxa = new float[a * d];
        RmsNorm.Backward(_answerInput, a, d, p, _finalGain.Offset, _finalInv, dNorm, dxa, false, g, _finalGain.Offset);
        Array.Clear(_dx);
        for (int i = 0; i < a; i++) dxa.AsSpan(i * d, d).CopyTo(_dx.AsSpan(_answerRows[i] * d, d));

        for (int l = _c.Layers - 1; l >= 0; l--)
        {
            var w = _weights[l];
            bool lightning = ModelConfig.IsLightning(l);
            // x_{l+1} = x_l + u·Wo: dWo += uᵀ·dx, du = dx·Woᵀ.
            _math.AddMatMulTransposedA(lightning ? _u[l] : _o[l], _rows, d, _dx, d, g, w.Wo.Offset);
            _math.MatMulTransposedB(_dx, _rows, d, p, w.Wo.Offset, d, lightning ? _du : _dO, accumulate: false);
            if (lightning) RmsNorm.Backward(_o[l], _rows * _c.Heads, _c.HeadDim, null, 0, _invOut[l], _du, _dO, false, null, 0);
            _attention[l].Backward(_dO, _dq, _dk, _dv);
            _math.AddMatMulTransposedA(_h[l], _rows, d, _dq, d, g, w.Wq.Offset);
            _math.AddMatMulTransposedA(_h[l], _rows, d, _dk, d, g, w.Wk.Offset);
            _math.AddMatMulTransposedA(_h[l], _rows, d, _dv, d, g, w.Wv.Offset);
            _math.MatMulTransposedB(_dq, _rows, d, p, w.Wq.Offset, d, _dh, accumulate: false);
            _math.MatMulTransposedB(_dk, _rows, d, p, w.Wk.Offset, d, _dh, accumulate: true);
            _math.MatMulTransposedB(_dv, _rows, d, p, w.Wv.Offset, d, _dh, accumulate: true);
            // The residual carries dx through; the norm adds its share.
            RmsNorm.Backward(_x[l], _rows, d, p, w.Gain.Offset, _invIn[l], _dh, _dx, true, g, w.Gain.Offset);
        }
        for (int r = 0; r < _rows; r++)
        {
            HostMath.Axpy(1f, _dx.AsSpan(r * d, d), g.AsSpan(_embedding.Offset + _tokens[r] * d, d));
            if (_bound[r] >= 0) HostMath.Axpy(1f, _dx.AsSpan(r * d, d), g.AsSpan(_embedding.Offset + _bound[r] * d, d));
        }
    }

    public void Dispose()
    {
        foreach (var a in _attention) a.Dispose();
    }
}
