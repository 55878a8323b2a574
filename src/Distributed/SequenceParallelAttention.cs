using System.Diagnostics;
using Distributed.Cluster;
using Distributed.Kernels;
using Distributed.Schemes;

namespace Distributed;

/// <summary>The attention family.</summary>
public enum AttentionKind
{
    /// <summary>Softmax attention (FlashAttention-2 kernels, O and LSE).</summary>
    Softmax,
    /// <summary>Lightning (linear) attention with optional per-head decay.</summary>
    Lightning,
}

/// <summary>How the layer is split over ranks.</summary>
public enum ParallelScheme
{
    /// <summary>LASP-2 (lightning): one all-gather of [B,H,D,Dv] chunk states per pass.</summary>
    Lasp2,
    /// <summary>All-gather K and V (softmax; LASP-2H / Llama-3 context parallel); backward reduce-scatters dK, dV.</summary>
    AllGather,
    /// <summary>Partial softmax states: KV stays sharded, Q and the (O, LSE) partials move.</summary>
    Partial,
    /// <summary>Ring attention: KV blocks travel around the ring while the current block computes.</summary>
    Ring,
    /// <summary>Ulysses: all-to-all from sequence shards to head shards and back.</summary>
    Ulysses,
    /// <summary>2-D: Ulysses inside head groups, a sequence scheme across them.</summary>
    Hybrid,
}

/// <summary>How the sequence is cut into shards.</summary>
public enum ShardLayout
{
    /// <summary>Rank r owns chunk r of P.</summary>
    Contiguous,
    /// <summary>Rank r owns chunks r and 2P−1−r of 2P (balances causal work).</summary>
    Zigzag,
}

/// <summary>Global problem size: Q <c>[B,N,H,D]</c>, K <c>[B,N,Hk,D]</c>, V <c>[B,N,Hk,Dv]</c>.</summary>
/// <param name="Batch">B.</param>
/// <param name="SeqLen">N, global tokens.</param>
/// <param name="Heads">H, query heads.</param>
/// <param name="KvHeads">Hk, key/value heads (H % Hk == 0).</param>
/// <param name="HeadDim">D, head dim of Q and K.</param>
/// <param name="ValueDim">Dv, head dim of V.</param>
public sealed record AttentionShape(int Batch, int SeqLen, int Heads, int KvHeads, int HeadDim, int ValueDim);

/// <summary>Options of <see cref="SequenceParallelAttention"/>.</summary>
public sealed record SequenceParallelOptions
{
    /// <summary>Softmax or lightning.</summary>
    public AttentionKind Attention { get; init; } = AttentionKind.Softmax;

    /// <summary>The parallel scheme.</summary>
    public ParallelScheme Scheme { get; init; } = ParallelScheme.AllGather;

    /// <summary>Causal masking (global positions).</summary>
    public bool Causal { get; init; } = true;

    /// <summary>Token layout; null picks the scheme's best (zigzag for causal all-gather and LASP-2).</summary>
    public ShardLayout? Layout { get; init; }

    /// <summary>Lightning only: per-head λ_h in (0, 1]; null means no decay.</summary>
    public float[]? Decay { get; init; }

    /// <summary>Softmax only: the scale; 0 means 1/sqrt(D).</summary>
    public float Scale { get; init; }

    /// <summary>Hybrid: ranks per head group Ph; 0 chooses the largest divisor of P that divides H.</summary>
    public int UlyssesDegree { get; init; }

    /// <summary>Hybrid softmax: the sequence scheme across head groups (lightning always uses LASP-2).</summary>
    public ParallelScheme HybridSequenceScheme { get; init; } = ParallelScheme.AllGather;
}

/// <summary>Milliseconds spent computing (kernels, synchronised) and communicating (collectives and staging).</summary>
/// <param name="ComputeMs">Kernel time.</param>
/// <param name="CommunicationMs">Collective time, including host staging.</param>
public sealed record PhaseTimings(double ComputeMs, double CommunicationMs);

/// <summary>
/// One attention layer split over the ranks of a communicator: the public entry point. Each rank calls
/// <see cref="Forward"/> (and, in training, <see cref="Backward"/>) with its local shards; the result is the
/// single-device result's rows for the tokens this rank owns (<see cref="LocalTokenRanges"/>).
/// </summary>
public sealed class SequenceParallelAttention : IDisposable
{
    private readonly IScheme _scheme;
    private readonly PhaseClock _clock;
    private readonly AttentionShape _shape;
    private bool _forwardRan;

    /// <summary>Validates the shape and options against the communicator and builds the scheme.</summary>
    /// <exception cref="ArgumentException">A shape or option the scheme cannot take; the message names the
    /// parameter and the fix.</exception>
    public SequenceParallelAttention(ICommunicator communicator, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options)
    {
        ArgumentNullException.ThrowIfNull(communicator);
        ArgumentNullException.ThrowIfNull(backend);
        ArgumentNullException.ThrowIfNull(shape);
        ArgumentNullException.ThrowIfNull(options);
        Validate(shape, options);
        _shape = shape;
        var layout = options.Layout ?? DefaultLayout(options);
        CheckFits(shape, options with { Layout = layout }, communicator.Size, communicator is InProcessCommunicator ? communicator.Size : 1,
            checkHostMemory: backend is Distributed.Kernels.Cpu.CpuBackend);
        InputChecks.AgreeAcrossRanks(communicator, shape, options, layout);
        _clock = new PhaseClock(backend);
        _scheme = options.Scheme switch
        {
            ParallelScheme.Lasp2 => new LaspLinearAttention(communicator, backend, shape, options, layout, _clock),
            ParallelScheme.AllGather => new AllGatherSoftmaxAttention(communicator, backend, shape, options, layout, _clock),
            ParallelScheme.Ulysses => new UlyssesAttention(communicator, backend, shape, options, layout, _clock),
            ParallelScheme.Ring => new RingSoftmaxAttention(communicator, backend, shape, options, layout, _clock),
            ParallelScheme.Partial => new PartialSoftmaxAttention(communicator, backend, shape, options, layout, _clock),
            ParallelScheme.Hybrid => new HybridAttention(communicator, backend, shape, options, layout, _clock),
            _ => throw new ArgumentOutOfRangeException(nameof(options), options.Scheme, "Unknown scheme."),
        };
    }

    /// <summary>The global token ranges this rank owns, in local order (zigzag: two ranges).</summary>
    public IReadOnlyList<(int Start, int Count)> LocalTokenRanges => _scheme.Ranges;

    /// <summary>Σ of the range counts: the local sequence length.</summary>
    public int LocalTokens => _scheme.Ranges.Sum(r => r.Count);

    /// <summary>Compute and communication time since construction or <see cref="ResetTimings"/>.</summary>
    public PhaseTimings Timings => _clock.Timings;

    /// <summary>Zeroes <see cref="Timings"/>.</summary>
    public void ResetTimings() => _clock.Reset();

    /// <summary>
    /// Forward over the local shards: q <c>[B,Nloc,H,D]</c>, k <c>[B,Nloc,Hk,D]</c>, v <c>[B,Nloc,Hk,Dv]</c>;
    /// writes o <c>[B,Nloc,H,Dv]</c>. Collective: every rank calls it.
    /// </summary>
    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        InputChecks.LocalTensors(_shape, LocalTokens, (q, nameof(q), _shape.Heads, _shape.HeadDim), (k, nameof(k), _shape.KvHeads, _shape.HeadDim), (v, nameof(v), _shape.KvHeads, _shape.ValueDim), (o, nameof(o), _shape.Heads, _shape.ValueDim));
        _scheme.Forward(q, k, v, o);
        _forwardRan = true;
    }

    /// <summary>
    /// Backward after <see cref="Forward"/>: given dO <c>[B,Nloc,H,Dv]</c>, writes the gradients of the local
    /// shards dQ <c>[B,Nloc,H,D]</c>, dK <c>[B,Nloc,Hk,D]</c>, dV <c>[B,Nloc,Hk,Dv]</c>. Collective.
    /// </summary>
    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV)
    {
        InputChecks.LocalTensors(_shape, LocalTokens, (dO, nameof(dO), _shape.Heads, _shape.ValueDim), (dQ, nameof(dQ), _shape.Heads, _shape.HeadDim), (dK, nameof(dK), _shape.KvHeads, _shape.HeadDim), (dV, nameof(dV), _shape.KvHeads, _shape.ValueDim));
        _scheme.Backward(dO, dQ, dK, dV);
    }

    /// <summary>
    /// Softmax attention: copies the log-sum-exp of the last <see cref="Forward"/> for this rank's query rows,
    /// <c>[B, H, Nloc]</c> in local token order (natural log, of the scaled scores), into <paramref name="lse"/>.
    /// Collective: every rank calls it (Ulysses brings it back from head shards with one all-to-all).
    /// </summary>
    /// <exception cref="ArgumentException"><paramref name="lse"/> is not <c>[B, H, Nloc]</c>.</exception>
    /// <exception cref="InvalidOperationException">No forward has run yet.</exception>
    /// <exception cref="NotSupportedException">Lightning attention (it has no LSE).</exception>
    public void CopyLse(DeviceTensor lse)
    {
        AttentionDims.Expect(lse, nameof(lse), _shape.Batch, _shape.Heads, LocalTokens);
        if (!_forwardRan) throw new InvalidOperationException("CopyLse reads the last forward's log-sum-exp: call Forward first.");
        _scheme.CopyLse(lse);
    }

    /// <summary>
    /// One decode step with the KV cache sharded over ranks (partial softmax states): q <c>[B, Nq, H, D]</c>
    /// holds the same new tokens on every rank, at global positions starting at <paramref name="queryPosition"/>;
    /// kLocal <c>[B, Nkv_r, Hk, D]</c> and vLocal <c>[B, Nkv_r, Hk, Dv]</c> are this rank's cache shard,
    /// starting at global position <paramref name="kvStart"/>. Every rank gets o <c>[B, Nq, H, Dv]</c>. One
    /// all-gather of B·Nq·H·(Dv+1) floats per rank, independent of the cache length. Collective.
    /// </summary>
    /// <exception cref="ArgumentException">Shapes that do not fit (the parameter is named).</exception>
    public static void Decode(ICommunicator communicator, IKernelBackend backend, DeviceTensor q, long queryPosition,
        DeviceTensor kLocal, DeviceTensor vLocal, long kvStart, DeviceTensor o, bool causal = true, float scale = 0f)
    {
        ArgumentNullException.ThrowIfNull(communicator);
        ArgumentNullException.ThrowIfNull(backend);
        var dims = AttentionDims.FromQkv(q, kLocal, vLocal);
        AttentionDims.Expect(o, nameof(o), dims.B, dims.Nq, dims.H, dims.Dv);
        PartialSoftmaxAttention.Decode(communicator, backend, q, queryPosition, kLocal, vLocal, kvStart, o, causal, scale);
    }

    /// <summary>Releases the scheme's device buffers.</summary>
    public void Dispose() => _scheme.Dispose();

    /// <summary>
    /// TransNormerLLM's decay: <c>λ_h = exp(−s_h)</c> with <c>s_h</c> the ALiBi slopes for H heads
    /// (<c>2^(−8(h+1)/H)</c> for H a power of two; otherwise those of the nearest lower power of two,
    /// then every other slope of twice as many).
    /// </summary>
    public static float[] DefaultDecay(int heads)
    {
        if (heads < 1) throw new ArgumentOutOfRangeException(nameof(heads), heads, "At least one head.");
        static double[] PowerOfTwo(int n) => Enumerable.Range(1, n).Select(i => Math.Pow(2, -8.0 * i / n)).ToArray();
        int p = 1;
        while (p * 2 <= heads) p *= 2;
        var slopes = PowerOfTwo(p).ToList();
        if (p < heads) slopes.AddRange(PowerOfTwo(2 * p).Where((_, i) => i % 2 == 0).Take(heads - p));
        return slopes.Select(s => (float)Math.Exp(-s)).ToArray();
    }

    /// <summary>
    /// The bytes one rank holds for a forward and backward step of this shape on <paramref name="ranks"/>
    /// ranks: its local shards of q, k, v, o, dO, dQ, dK and dV (the caller's tensors), what the scheme
    /// gathers or keeps for the backward pass (device tensors), and its host staging buffers. Kernel scratch
    /// (a few MiB, plus up to 16 MiB of packed K/V per CPU backend, or one KV head if larger) is not included. Call it before the ranks
    /// start to refuse a shape early; 64-bit throughout, so any shape gives a number, never an overflow.
    /// </summary>
    /// <exception cref="ArgumentException">An invalid shape or option (the same checks as the constructor).</exception>
    public static long EstimateBytesPerRank(AttentionShape shape, SequenceParallelOptions options, int ranks)
    {
        ArgumentNullException.ThrowIfNull(shape);
        ArgumentNullException.ThrowIfNull(options);
        if (ranks < 1) throw new ArgumentOutOfRangeException(nameof(ranks), ranks, "At least one rank.");
        Validate(shape, options);
        return MemoryEstimate.For(shape, options, ranks, options.Layout ?? DefaultLayout(options)).TotalBytes;
    }

    /// <summary>
    /// Refuses, with the bytes needed per rank, a shape whose rank data cannot be held: one buffer or
    /// collective past what one array holds (schemes other than all-gather KV stage whole tensors), or, when
    /// <paramref name="checkHostMemory"/>, more than this machine's memory for <paramref name="ranksOnThisHost"/>
    /// ranks. A launcher calls it once before starting ranks; the constructor calls it too (host memory only on
    /// the CPU backend).
    /// </summary>
    /// <param name="shape">The global shape.</param>
    /// <param name="options">The scheme and its options.</param>
    /// <param name="ranks">P, the ranks of the layer.</param>
    /// <param name="ranksOnThisHost">Ranks that share this machine's memory.</param>
    /// <param name="checkHostMemory">Also compare the estimate with this machine's memory.</param>
    /// <exception cref="ArgumentException">The shape does not fit; the message gives the bytes per rank and the fix.</exception>
    public static void CheckFits(AttentionShape shape, SequenceParallelOptions options, int ranks, int ranksOnThisHost, bool checkHostMemory = true)
    {
        ArgumentNullException.ThrowIfNull(shape);
        ArgumentNullException.ThrowIfNull(options);
        if (ranks < 1) throw new ArgumentOutOfRangeException(nameof(ranks), ranks, "At least one rank.");
        Validate(shape, options);
        InputChecks.Partition(shape, options, options.Layout ?? DefaultLayout(options), ranks);
        var e = MemoryEstimate.For(shape, options, ranks, options.Layout ?? DefaultLayout(options));
        string what = $"{options.Scheme} over {ranks} rank(s) at B={shape.Batch}, N={shape.SeqLen}, H={shape.Heads}, Hk={shape.KvHeads}, D={shape.HeadDim}, Dv={shape.ValueDim}";
        string need = $"needs {Gib(e.TotalBytes)} per rank ({Gib(e.CallerFloats * 4L)} of local q, k, v, o and gradients, {Gib(e.SchemeFloats * 4L)} of scheme tensors, {Gib(e.StagingFloats * 4L)} of host staging)";
        if (e.LargestSingleFloats > Array.MaxLength)
            throw new ArgumentException($"{what} {need}, and one of its buffers or collectives would hold {e.LargestSingleFloats:N0} floats, more than the {Array.MaxLength:N0} one array or one collective takes; use more ranks or a shorter sequence.", nameof(shape));
        if (checkHostMemory)
        {
            long available = GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
            int sharing = Math.Max(1, ranksOnThisHost);
            if (available > 0 && e.TotalBytes > available / sharing)
                throw new ArgumentException($"{what} {need}, but this machine has {Gib(available)} for {sharing} rank(s) on it; use more ranks (machines) or a shorter sequence.", nameof(shape));
        }
    }

    private static string Gib(long bytes) => bytes >= 1L << 30 ? $"{bytes / (double)(1L << 30):F1} GiB" : $"{bytes / (double)(1L << 20):F1} MiB";

    private static ShardLayout DefaultLayout(SequenceParallelOptions o) =>
        o.Causal && (o.Scheme is ParallelScheme.Lasp2 or ParallelScheme.AllGather or ParallelScheme.Ring
            || (o.Scheme == ParallelScheme.Hybrid && (o.Attention == AttentionKind.Lightning || o.HybridSequenceScheme != ParallelScheme.Partial)))
            ? ShardLayout.Zigzag : ShardLayout.Contiguous;

    private static void Validate(AttentionShape s, SequenceParallelOptions o)
    {
        if (s.Batch < 1 || s.SeqLen < 1 || s.Heads < 1 || s.KvHeads < 1 || s.HeadDim < 1 || s.ValueDim < 1)
            throw new ArgumentException($"Every dimension of {s} must be at least 1.", "shape");
        if (s.Heads % s.KvHeads != 0)
            throw new ArgumentException($"Heads {s.Heads} is not a multiple of KvHeads {s.KvHeads}; GQA needs H % Hk == 0 (e.g. KvHeads = {s.Heads}).", "shape");
        if (o.Attention == AttentionKind.Lightning)
        {
            if (o.Scheme is ParallelScheme.AllGather or ParallelScheme.Partial or ParallelScheme.Ring)
                throw new ArgumentException($"Scheme {o.Scheme} is for softmax attention; lightning attention uses Lasp2, Ulysses or Hybrid.", "options");
            if (o.Decay is { } d)
            {
                if (d.Length != s.Heads) throw new ArgumentException($"Decay has {d.Length} values but there are {s.Heads} heads; give one λ per head.", "options");
                if (d.Any(l => !(l > 0f && l <= 1f))) throw new ArgumentException("Every decay λ must be in (0, 1]; 1 means no decay.", "options");
            }
        }
        else if (o.Scheme == ParallelScheme.Lasp2)
            throw new ArgumentException("LASP-2 is for lightning (linear) attention; softmax attention uses AllGather, Partial, Ring, Ulysses or Hybrid.", "options");
        InputChecks.Options(s, o);
    }
}

/// <summary>What every scheme provides to the entry point.</summary>
internal interface IScheme : IDisposable
{
    IReadOnlyList<(int Start, int Count)> Ranges { get; }

    void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o);

    void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV);

    /// <summary>Softmax schemes: the local LSE of the last forward, <c>[B, H, Nloc]</c> in local token order.</summary>
    void CopyLse(DeviceTensor lse) =>
        throw new NotSupportedException($"{GetType().Name} does not expose its log-sum-exp; LSE exists for softmax attention only.");
}

/// <summary>Splits a step's wall time into compute (kernels, synchronised) and communication.</summary>
internal sealed class PhaseClock(IKernelBackend backend)
{
    private readonly Stopwatch _compute = new();
    private readonly Stopwatch _comm = new();

    public PhaseTimings Timings => new(_compute.Elapsed.TotalMilliseconds, _comm.Elapsed.TotalMilliseconds);

    public void Reset()
    {
        _compute.Reset();
        _comm.Reset();
    }

    public void Compute(Action work)
    {
        _compute.Start();
        try
        {
            work();
            backend.Synchronize();
        }
        finally { _compute.Stop(); }
    }

    public void Communicate(Action work)
    {
        _comm.Start();
        try { work(); }
        finally { _comm.Stop(); }
    }
}
