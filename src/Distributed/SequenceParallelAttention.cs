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

/// <summary>
/// How the layer is split over ranks. Each member registers its scheme's descriptor (name, attention kinds,
/// validation, default layout, memory estimate, construction) with one attribute; see <see cref="SchemeRegistry"/>.
/// </summary>
public enum ParallelScheme
{
    /// <summary>LASP-2 (lightning): the [B,H,D,Dv] chunk states all-gathered once per pass (overlapped zigzag: in two halves).</summary>
    [RegisteredScheme(typeof(Lasp2Descriptor))] Lasp2,
    /// <summary>LASP-1 (lightning): the chunk states travel along a serial chain of P−1 point-to-point hops per pass (contiguous layout).</summary>
    [RegisteredScheme(typeof(Lasp1Descriptor))] Lasp1,
    /// <summary>All-gather K and V (softmax; LASP-2H / Llama-3 context parallel); backward reduce-scatters dK, dV.</summary>
    [RegisteredScheme(typeof(AllGatherSoftmaxDescriptor))] AllGather,
    /// <summary>Partial softmax states: KV stays sharded, Q and the (O, LSE) partials move.</summary>
    [RegisteredScheme(typeof(PartialSoftmaxDescriptor))] Partial,
    /// <summary>Ring attention: KV blocks travel around the ring while the current block computes.</summary>
    [RegisteredScheme(typeof(RingSoftmaxDescriptor))] Ring,
    /// <summary>Ulysses: all-to-all from sequence shards to head shards and back.</summary>
    [RegisteredScheme(typeof(UlyssesDescriptor))] Ulysses,
    /// <summary>2-D: Ulysses inside head groups, a sequence scheme across them.</summary>
    [RegisteredScheme(typeof(HybridDescriptor))] Hybrid,
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

    /// <summary>
    /// Hide communication behind compute where the scheme can: LASP-2 starts its state all-gather and computes
    /// the intra-chunk part while it is in flight. False keeps the blocking path (for comparison and debugging).
    /// </summary>
    public bool Overlap { get; init; } = true;
}

/// <summary>Milliseconds spent computing (kernels, synchronised) and communicating (collectives and staging).</summary>
/// <param name="ComputeMs">Kernel time.</param>
/// <param name="CommunicationMs">Collective time, including host staging.</param>
public sealed record PhaseTimings(double ComputeMs, double CommunicationMs);

/// <summary>What a saved context keeps of the forward's inputs for its backward pass.</summary>
public enum SavedInputs
{
    /// <summary>
    /// References to the caller's q, k, v and o (no copy, no memory). Forward records a checksum of each;
    /// Backward recomputes them and refuses, naming the tensor, if any was changed or disposed in between.
    /// </summary>
    Reference,
    /// <summary>
    /// Copies of q, k and v (and o) owned by the context, from a pool reused across steps: the caller may
    /// change or reuse its tensors as soon as Forward returns.
    /// </summary>
    Copy,
    /// <summary>
    /// References without checksums: no copy and no extra pass over the tensors (on GPU backends the checksum
    /// goes through host memory), for callers that guarantee q, k, v and o stay unchanged until Backward.
    /// A change is not detected: the gradients would silently be wrong.
    /// </summary>
    Unchecked,
}

/// <summary>
/// One attention layer split over the ranks of a communicator: the public entry point. Each rank calls
/// Forward (and, in training, Backward) with its local shards; the result is the single-device result's
/// rows for the tokens this rank owns (<see cref="LocalTokenRanges"/>; <see cref="Shard(ReadOnlySpan{float}, DeviceTensor)"/>
/// and <see cref="Gather(DeviceTensor)"/> move whole tensors in and out).
/// <para>
/// Training: <see cref="Forward(DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor, SavedInputs)"/> returns an
/// <see cref="AttentionContext"/> that holds what Backward needs; <see cref="Backward(AttentionContext, DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor, bool)"/>
/// consumes it. Any number of contexts may be alive at once (several micro-batches, activation
/// checkpointing); each holds one instance of the scheme's saved tensors, taken from a pool that Backward
/// and <see cref="AttentionContext.Dispose"/> return it to, so steady-state steps allocate nothing large.
/// <see cref="Forward(DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor)"/> and
/// <see cref="Backward(DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor, bool)"/> are the one-context convenience.
/// </para>
/// <para>Every method that communicates is collective: every rank calls it, in the same order. Not thread-safe.</para>
/// </summary>
public sealed class SequenceParallelAttention : IDisposable
{
    private readonly ICommunicator _comm;
    private readonly IKernelBackend _backend;
    private readonly SchemeDescriptor _descriptor;
    private readonly SchemeSetup _setup;
    private readonly PhaseClock _clock;
    private readonly AttentionShape _shape;
    private readonly SharedResources _shared = new();
    private readonly List<SchemeSlot> _slots = [];
    private AttentionContext? _implicit;
    private (SchemeSlot Slot, long Forward)? _lse;   // the last convenience forward, for CopyLse
    private DeviceTensor[]? _accumulateScratch;   // dQ, dK, dV for accumulating backward passes
    private DeviceTensor[]? _hostScratch;         // dO, dQ, dK, dV for the span overloads
    private IReadOnlyList<(int Start, int Count)>[]? _allRanges;
    private bool _disposed;

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
        _comm = communicator;
        _backend = backend;
        _descriptor = SchemeRegistry.Get(options.Scheme);
        var layout = options.Layout ?? _descriptor.DefaultLayout(options);
        CheckFits(shape, options with { Layout = layout }, communicator.Size, communicator is InProcessCommunicator ? communicator.Size : 1,
            checkHostMemory: backend is Distributed.Kernels.Cpu.CpuBackend);
        InputChecks.AgreeAcrossRanks(communicator, shape, options, layout);
        _clock = new PhaseClock(backend);
        // Staging arrays of ILGPU tensors are page-locked (HostBuffer); this rank's threads inherit the choice.
        HostBuffer.PageLockWith.Value = backend as Distributed.Kernels.Ilgpu.IlgpuBackend;
        _setup = new SchemeSetup(communicator, backend, shape, options with { Layout = layout }, layout, _clock, _shared);
        Options = options with { Layout = layout };
        try { _slots.Add(new SchemeSlot(_descriptor.Create(_setup))); }
        catch
        {
            _shared.Dispose();
            throw;
        }
        LocalTokenRanges = _slots[0].Scheme.Ranges;
        LocalTokens = LocalTokenRanges.Sum(r => r.Count);
    }

    /// <summary>The global shape.</summary>
    public AttentionShape Shape => _shape;

    /// <summary>The options, with the layout resolved (<see cref="SequenceParallelOptions.Layout"/> never null).</summary>
    public SequenceParallelOptions Options { get; }

    /// <summary>The global token ranges this rank owns, in local order (zigzag: two ranges).</summary>
    public IReadOnlyList<(int Start, int Count)> LocalTokenRanges { get; }

    /// <summary>Σ of the range counts: the local sequence length Nloc.</summary>
    public int LocalTokens { get; }

    /// <summary>Contexts alive now (returned by Forward, neither consumed by Backward nor disposed).</summary>
    public int LiveContexts => _slots.Count(s => s.Busy);

    /// <summary>Scheme instances made so far: the most contexts that were alive at once (the pool only grows).</summary>
    public int PooledContexts => _slots.Count;

    /// <summary>Compute and communication time since construction or <see cref="ResetTimings"/>.</summary>
    public PhaseTimings Timings => _clock.Timings;

    /// <summary>Zeroes <see cref="Timings"/>.</summary>
    public void ResetTimings() => _clock.Reset();

    /// <summary>
    /// The one-context convenience: forward over the local shards q <c>[B,Nloc,H,D]</c>, k <c>[B,Nloc,Hk,D]</c>,
    /// v <c>[B,Nloc,Hk,Dv]</c>, writing o <c>[B,Nloc,H,Dv]</c>, and keeping one implicit context (references
    /// to q, k, v and o, checked by <see cref="Backward(DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor, bool)"/>).
    /// A second call replaces the implicit context. Collective.
    /// </summary>
    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        ReleaseImplicit();
        _implicit = Forward(q, k, v, o, SavedInputs.Reference);
        _lse = (_implicit.Slot, _implicit.Slot.Forwards);
    }

    /// <summary>
    /// Forward over the local shards q <c>[B,Nloc,H,D]</c>, k <c>[B,Nloc,Hk,D]</c>, v <c>[B,Nloc,Hk,Dv]</c>;
    /// writes o <c>[B,Nloc,H,Dv]</c> and returns the context that Backward consumes (dispose it instead when no
    /// backward follows). Collective.
    /// </summary>
    /// <param name="q">Local queries.</param>
    /// <param name="k">Local keys.</param>
    /// <param name="v">Local values.</param>
    /// <param name="o">Local output (written).</param>
    /// <param name="saved">Whether the context references the caller's tensors (checked at Backward) or copies them.</param>
    /// <exception cref="ArgumentException">A tensor of the wrong shape (named).</exception>
    public AttentionContext Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o, SavedInputs saved)
    {
        ThrowIfDisposed();
        ExpectInputs(q, k, v, o);
        var slot = Rent();
        try
        {
            if (saved == SavedInputs.Copy)
            {
                var c = slot.Copies(_backend, _shape, LocalTokens);
                Copy(q, c[0]);
                Copy(k, c[1]);
                Copy(v, c[2]);
                slot.Forward(c[0], c[1], c[2], c[3]);
                Copy(c[3], o);
                return new AttentionContext(this, slot, saved, null);
            }
            slot.Forward(q, k, v, o);
            if (saved == SavedInputs.Unchecked) return new AttentionContext(this, slot, saved, null);
            (string Name, DeviceTensor Tensor)[] inputs = [("q", q), ("k", k), ("v", v), ("o", o)];
            var sums = inputs.Select(t => (t.Name, t.Tensor, TensorChecksum.Of(t.Tensor))).ToArray();
            return new AttentionContext(this, slot, saved, sums);
        }
        catch
        {
            slot.Busy = false;
            throw;
        }
    }

    /// <summary>
    /// Forward from host memory (the common CPU case): q, k, v are this rank's shards laid out as
    /// <c>[B,Nloc,H,D]</c>, <c>[B,Nloc,Hk,D]</c>, <c>[B,Nloc,Hk,Dv]</c>; o <c>[B,Nloc,H,Dv]</c> is written. The
    /// inputs are copied into the context (<see cref="SavedInputs.Copy"/>), so the spans may change afterwards.
    /// Collective.
    /// </summary>
    /// <exception cref="ArgumentException">A span of the wrong length (named, with the shape it needs).</exception>
    public AttentionContext Forward(ReadOnlySpan<float> q, ReadOnlySpan<float> k, ReadOnlySpan<float> v, Span<float> o)
    {
        ThrowIfDisposed();
        int b = _shape.Batch, n = LocalTokens, h = _shape.Heads, hk = _shape.KvHeads, d = _shape.HeadDim, dv = _shape.ValueDim;
        ExpectLength(q.Length, "q", b, n, h, d);
        ExpectLength(k.Length, "k", b, n, hk, d);
        ExpectLength(v.Length, "v", b, n, hk, dv);
        ExpectLength(o.Length, "o", b, n, h, dv);
        var slot = Rent();
        try
        {
            var c = slot.Copies(_backend, _shape, LocalTokens);
            c[0].CopyFromHost(q);
            c[1].CopyFromHost(k);
            c[2].CopyFromHost(v);
            slot.Forward(c[0], c[1], c[2], c[3]);
            c[3].CopyToHost(o);
            return new AttentionContext(this, slot, SavedInputs.Copy, null);
        }
        catch
        {
            slot.Busy = false;
            throw;
        }
    }

    /// <summary>
    /// The one-context convenience: backward of the last <see cref="Forward(DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor)"/>,
    /// which it consumes. Given dO <c>[B,Nloc,H,Dv]</c>, writes (or, with <paramref name="accumulate"/>, adds to)
    /// dQ <c>[B,Nloc,H,D]</c>, dK <c>[B,Nloc,Hk,D]</c>, dV <c>[B,Nloc,Hk,Dv]</c>. Collective.
    /// </summary>
    /// <exception cref="InvalidOperationException">No forward to consume, or q, k, v or o changed since it.</exception>
    public void Backward(DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, bool accumulate = false)
    {
        ThrowIfDisposed();
        var context = _implicit;
        if (context is null)
            throw new InvalidOperationException("Backward(dO, dQ, dK, dV) consumes the saved forward of the last Forward(q, k, v, o), and there is none: call Forward first (each Forward allows one Backward), or use the context that Forward(q, k, v, o, saved) returns.");
        _implicit = null;
        Backward(context, dO, dQ, dK, dV, accumulate);
    }

    /// <summary>
    /// Backward of the forward that made <paramref name="context"/>, which it consumes (its pooled buffers go
    /// back to the pool). Given dO <c>[B,Nloc,H,Dv]</c>, writes dQ <c>[B,Nloc,H,D]</c>, dK <c>[B,Nloc,Hk,D]</c>
    /// and dV <c>[B,Nloc,Hk,Dv]</c>, or adds into them when <paramref name="accumulate"/> is true (gradient
    /// accumulation over micro-batches). Collective.
    /// </summary>
    /// <exception cref="ObjectDisposedException">The context was disposed.</exception>
    /// <exception cref="InvalidOperationException">The context was consumed already, belongs to another layer, or
    /// (with <see cref="SavedInputs.Reference"/>) one of q, k, v, o changed or was disposed since its Forward.</exception>
    public void Backward(AttentionContext context, DeviceTensor dO, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, bool accumulate = false)
    {
        ThrowIfDisposed();
        var slot = Peek(context);
        InputChecks.LocalTensors(_shape, LocalTokens, (dO, nameof(dO), _shape.Heads, _shape.ValueDim), (dQ, nameof(dQ), _shape.Heads, _shape.HeadDim), (dK, nameof(dK), _shape.KvHeads, _shape.HeadDim), (dV, nameof(dV), _shape.KvHeads, _shape.ValueDim));
        context.VerifyInputs();
        context.Consume();
        try
        {
            if (!accumulate) slot.Scheme.Backward(dO, dQ, dK, dV);
            else
            {
                var g = _accumulateScratch ??= [Like(dQ), Like(dK), Like(dV)];
                slot.Scheme.Backward(dO, g[0], g[1], g[2]);
                _clock.Compute(() =>
                {
                    TensorChecksum.AddInto(g[0], dQ);
                    TensorChecksum.AddInto(g[1], dK);
                    TensorChecksum.AddInto(g[2], dV);
                });
            }
        }
        finally { slot.Busy = false; }
    }

    /// <summary>
    /// Backward to host memory (the common CPU case): dO <c>[B,Nloc,H,Dv]</c> in; dQ <c>[B,Nloc,H,D]</c>,
    /// dK <c>[B,Nloc,Hk,D]</c>, dV <c>[B,Nloc,Hk,Dv]</c> written, or added to with <paramref name="accumulate"/>.
    /// Consumes <paramref name="context"/>. Collective.
    /// </summary>
    public void Backward(AttentionContext context, ReadOnlySpan<float> dO, Span<float> dQ, Span<float> dK, Span<float> dV, bool accumulate = false)
    {
        ThrowIfDisposed();
        int b = _shape.Batch, n = LocalTokens, h = _shape.Heads, hk = _shape.KvHeads, d = _shape.HeadDim, dv = _shape.ValueDim;
        ExpectLength(dO.Length, "dO", b, n, h, dv);
        ExpectLength(dQ.Length, "dQ", b, n, h, d);
        ExpectLength(dK.Length, "dK", b, n, hk, d);
        ExpectLength(dV.Length, "dV", b, n, hk, dv);
        var t = _hostScratch ??= [_backend.Allocate(b, n, h, dv), _backend.Allocate(b, n, h, d), _backend.Allocate(b, n, hk, d), _backend.Allocate(b, n, hk, dv)];
        t[0].CopyFromHost(dO);
        Backward(context, t[0], t[1], t[2], t[3]);
        CopyOut(t[1], dQ, accumulate);
        CopyOut(t[2], dK, accumulate);
        CopyOut(t[3], dV, accumulate);
    }

    /// <summary>
    /// Softmax attention: copies the log-sum-exp of the last <see cref="Forward(DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor)"/>
    /// for this rank's query rows, <c>[B, H, Nloc]</c> in local token order (natural log, of the scaled scores),
    /// into <paramref name="lse"/>, before or after its Backward, until another Forward runs. Collective
    /// (Ulysses brings it back from head shards with one all-to-all).
    /// </summary>
    /// <exception cref="ArgumentException"><paramref name="lse"/> is not <c>[B, H, Nloc]</c>.</exception>
    /// <exception cref="InvalidOperationException">No forward has run yet, or another Forward reused its buffers.</exception>
    /// <exception cref="NotSupportedException">Lightning attention (it has no LSE).</exception>
    public void CopyLse(DeviceTensor lse)
    {
        ThrowIfDisposed();
        AttentionDims.Expect(lse, nameof(lse), _shape.Batch, _shape.Heads, LocalTokens);
        if (_lse is not { } last) throw new InvalidOperationException("CopyLse reads the last forward's log-sum-exp: call Forward(q, k, v, o) first.");
        if (last.Slot.Forwards != last.Forward)
            throw new InvalidOperationException("Another Forward has run since the last Forward(q, k, v, o) and reused its buffers; call CopyLse right after the forward whose log-sum-exp you need, or use CopyLse(context, lse).");
        last.Slot.Scheme.CopyLse(lse);
    }

    /// <summary>
    /// Softmax attention: copies the log-sum-exp that <paramref name="context"/>'s forward computed, <c>[B, H, Nloc]</c>
    /// in local token order, into <paramref name="lse"/>. Call it before Backward consumes the context. Collective.
    /// </summary>
    public void CopyLse(AttentionContext context, DeviceTensor lse)
    {
        ThrowIfDisposed();
        AttentionDims.Expect(lse, nameof(lse), _shape.Batch, _shape.Heads, LocalTokens);
        var slot = Peek(context);
        slot.Scheme.CopyLse(lse);
    }

    /// <summary>
    /// Copies this rank's rows of a whole tensor into its local shard: <paramref name="global"/> is
    /// <c>[B, N, …]</c> (every rank passes the same data, or at least the same rows for its tokens) and
    /// <paramref name="local"/> is <c>[B, Nloc, …]</c> with the same trailing dimensions. No communication; the
    /// layout (zigzag or contiguous, hybrid groups) is the scheme's.
    /// </summary>
    /// <exception cref="ArgumentException">The lengths do not fit one another (named).</exception>
    public void Shard(ReadOnlySpan<float> global, DeviceTensor local)
    {
        ArgumentNullException.ThrowIfNull(local);
        long rowWidth = RowWidth(local, nameof(local));
        long expected = (long)_shape.Batch * _shape.SeqLen * rowWidth;
        if (global.Length != expected)
            throw new ArgumentException($"global holds {global.Length} floats but [B={_shape.Batch}, N={_shape.SeqLen}, {rowWidth} per token] needs {expected}; pass the whole tensor whose local shard is {local}.", nameof(global));
        foreach (var seg in Sharding.Segments(_shape.Batch, _shape.SeqLen, (int)rowWidth, LocalTokenRanges))
            for (long done = 0; done < seg.Length;)
            {
                int count = (int)Math.Min(int.MaxValue / 2, seg.Length - done);
                local.CopyFromHost(global.Slice((int)(seg.GlobalOffset + done), count), seg.LocalOffset + done);
                done += count;
            }
    }

    /// <summary>
    /// This rank's rows of a whole host tensor <c>[B, N, rowWidth]</c>, as a new local array <c>[B, Nloc, rowWidth]</c>
    /// (rowWidth = heads × head dim). No communication.
    /// </summary>
    public float[] Shard(ReadOnlySpan<float> global, int rowWidth)
    {
        if (rowWidth < 1) throw new ArgumentOutOfRangeException(nameof(rowWidth), rowWidth, "rowWidth is heads × head dim, at least 1.");
        long expected = (long)_shape.Batch * _shape.SeqLen * rowWidth;
        if (global.Length != expected)
            throw new ArgumentException($"global holds {global.Length} floats but [B={_shape.Batch}, N={_shape.SeqLen}, {rowWidth}] needs {expected}.", nameof(global));
        var local = new float[(long)_shape.Batch * LocalTokens * rowWidth];
        Sharding.TakeLocal(global, local, _shape.Batch, _shape.SeqLen, rowWidth, LocalTokenRanges);
        return local;
    }

    /// <summary>
    /// The whole tensor <c>[B, N, …]</c> assembled from every rank's local shard <c>[B, Nloc, …]</c>, returned on
    /// every rank (one all-gather). Collective. For tensors past 2^31 floats, write each rank's rows to a file
    /// instead (<see cref="IO.NpyWriter"/>).
    /// </summary>
    /// <exception cref="ArgumentException">The whole tensor would not fit one array.</exception>
    public float[] Gather(DeviceTensor local)
    {
        ThrowIfDisposed();
        ArgumentNullException.ThrowIfNull(local);
        long rowWidth = RowWidth(local, nameof(local));
        var all = AllRanges();
        long total = (long)_shape.Batch * _shape.SeqLen * rowWidth;
        if (total > Array.MaxLength)
            throw new ArgumentException($"The whole tensor holds {total:N0} floats, more than one array takes; write each rank's rows to a .npy file instead (NpyWriter).", nameof(local));
        var counts = all.Select(r => checked(_shape.Batch * r.Sum(x => x.Count) * (int)rowWidth)).ToArray();
        var mine = new float[local.Length];
        local.CopyToHost(mine);
        var gathered = new float[total];
        _comm.AllGatherVariable(mine, gathered, counts);
        var global = new float[total];
        long offset = 0;
        for (int r = 0; r < all.Length; r++)
        {
            Sharding.PutLocal(gathered.AsSpan((int)offset, counts[r]), global, _shape.Batch, _shape.SeqLen, (int)rowWidth, all[r]);
            offset += counts[r];
        }
        return global;
    }

    /// <summary>A new local tensor <c>[B, Nloc, heads, dim]</c> on this layer's backend (zeroed on the CPU backend).</summary>
    public DeviceTensor AllocateLocal(int heads, int dim) => _backend.Allocate(_shape.Batch, LocalTokens, heads, dim);

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

    /// <summary>Releases every pooled scheme instance and buffer. Contexts still alive become unusable.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        _implicit = null;
        foreach (var slot in _slots) slot.Dispose();
        _slots.Clear();
        foreach (var t in _accumulateScratch ?? []) t.Dispose();
        foreach (var t in _hostScratch ?? []) t.Dispose();
        _shared.Dispose();
    }

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
    /// (a few MiB, plus up to 16 MiB of packed K/V per CPU backend, or one KV head if larger) is not included,
    /// nor are further saved contexts (each alive context holds its own scheme tensors). Call it before the ranks
    /// start to refuse a shape early; 64-bit throughout, so any shape gives a number, never an overflow.
    /// </summary>
    /// <exception cref="ArgumentException">An invalid shape or option (the same checks as the constructor).</exception>
    public static long EstimateBytesPerRank(AttentionShape shape, SequenceParallelOptions options, int ranks)
    {
        ArgumentNullException.ThrowIfNull(shape);
        ArgumentNullException.ThrowIfNull(options);
        if (ranks < 1) throw new ArgumentOutOfRangeException(nameof(ranks), ranks, "At least one rank.");
        Validate(shape, options);
        var d = SchemeRegistry.Get(options.Scheme);
        d.Validate(shape, options, ranks);
        return MemoryEstimate.For(shape, options, ranks, options.Layout ?? d.DefaultLayout(options)).TotalBytes;
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
        var d = SchemeRegistry.Get(options.Scheme);
        InputChecks.Partition(shape, options, options.Layout ?? d.DefaultLayout(options), ranks); // includes the scheme's own checks
        var e = MemoryEstimate.For(shape, options, ranks, options.Layout ?? d.DefaultLayout(options));
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

    private static void Validate(AttentionShape s, SequenceParallelOptions o)
    {
        if (s.Batch < 1 || s.SeqLen < 1 || s.Heads < 1 || s.KvHeads < 1 || s.HeadDim < 1 || s.ValueDim < 1)
            throw new ArgumentException($"Every dimension of {s} must be at least 1.", "shape");
        if (s.Heads % s.KvHeads != 0)
            throw new ArgumentException($"Heads {s.Heads} is not a multiple of KvHeads {s.KvHeads}; GQA needs H % Hk == 0 (e.g. KvHeads = {s.Heads}).", "shape");
        if (!Enum.IsDefined(o.Attention))
            throw new ArgumentException($"Attention {(int)o.Attention} is not an attention kind; use AttentionKind.Softmax or Lightning.", "options");
        var d = SchemeRegistry.Get(o.Scheme);
        if (!d.Kinds.Contains(o.Attention))
        {
            string kinds = string.Join(" and ", d.Kinds.Select(k => k.ToString().ToLowerInvariant()));
            string asked = o.Attention.ToString().ToLowerInvariant();
            throw new ArgumentException($"Scheme {o.Scheme} ({d.CliName}) is for {kinds} attention only, not {asked}; {asked} attention uses {string.Join(", ", SchemeRegistry.All.Where(x => x.Kinds.Contains(o.Attention)).Select(x => x.Scheme))}.", "options");
        }
        if (o.Attention == AttentionKind.Lightning && o.Decay is { } decay)
        {
            if (decay.Length != s.Heads) throw new ArgumentException($"Decay has {decay.Length} values but there are {s.Heads} heads; give one λ per head.", "options");
            if (decay.Any(l => !(l > 0f && l <= 1f))) throw new ArgumentException("Every decay λ must be in (0, 1]; 1 means no decay.", "options");
        }
        InputChecks.Options(s, o);
    }

    private SchemeSlot Rent()
    {
        foreach (var slot in _slots)
            if (!slot.Busy)
            {
                slot.Busy = true;
                return slot;
            }
        var made = new SchemeSlot(_descriptor.Create(_setup)) { Busy = true };
        _slots.Add(made);
        return made;
    }

    /// <summary>The slot of a live context of this layer.</summary>
    private SchemeSlot Peek(AttentionContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        if (!ReferenceEquals(context.Owner, this))
            throw new InvalidOperationException("This context was made by another SequenceParallelAttention (another layer); pass it to the Backward of the layer whose Forward returned it.");
        context.ThrowIfUnusable();
        return context.Slot;
    }

    internal void Release(AttentionContext context)
    {
        if (ReferenceEquals(_implicit, context)) _implicit = null;
        if (!_disposed) context.Slot.Busy = false;
    }

    private void ReleaseImplicit()
    {
        var previous = _implicit;
        _implicit = null;
        previous?.Dispose();
    }

    private void ExpectInputs(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        InputChecks.LocalTensors(_shape, LocalTokens, (q, nameof(q), _shape.Heads, _shape.HeadDim), (k, nameof(k), _shape.KvHeads, _shape.HeadDim), (v, nameof(v), _shape.KvHeads, _shape.ValueDim), (o, nameof(o), _shape.Heads, _shape.ValueDim));
        foreach (var (t, name) in new[] { (q, "q"), (k, "k"), (v, "v"), (o, "o") })
            if (t.IsDisposed) throw new ObjectDisposedException(name, $"{name} was disposed; pass a live tensor.");
    }

    private static void ExpectLength(long length, string name, int b, int n, int heads, int dim)
    {
        long need = (long)b * n * heads * dim;
        if (length != need)
            throw new ArgumentException($"{name} holds {length} floats but this rank's shard [B={b}, Nloc={n}, {heads}, {dim}] needs {need}; pass this rank's rows only (see LocalTokenRanges, or Shard).", name);
    }

    private long RowWidth(DeviceTensor local, string name)
    {
        if (local.Shape.Count < 2 || local.Shape[0] != _shape.Batch || local.Shape[1] != LocalTokens)
            throw new ArgumentException($"{name} is {local} but a local shard is [B={_shape.Batch}, Nloc={LocalTokens}, …].", name);
        long width = 1;
        for (int i = 2; i < local.Shape.Count; i++) width *= local.Shape[i];
        return width;
    }

    private void Copy(DeviceTensor source, DeviceTensor destination) =>
        _clock.Compute(() => _backend.CopySlice(source, 0, destination, 0, LocalTokens, 1));

    private DeviceTensor Like(DeviceTensor t) => _backend.Allocate([.. t.Shape]);

    private static void CopyOut(DeviceTensor source, Span<float> destination, bool accumulate)
    {
        if (!accumulate)
        {
            source.CopyToHost(destination);
            return;
        }
        var piece = new float[Math.Min(destination.Length, 1 << 20)];
        for (int done = 0; done < destination.Length; done += piece.Length)
        {
            var part = piece.AsSpan(0, Math.Min(piece.Length, destination.Length - done));
            source.CopyToHost(part, done);
            var target = destination.Slice(done, part.Length);
            for (int i = 0; i < part.Length; i++) target[i] += part[i];
        }
    }

    /// <summary>Every rank's token ranges (one small all-gather the first time; exact for any N).</summary>
    private IReadOnlyList<(int Start, int Count)>[] AllRanges()
    {
        if (_allRanges is not null) return _allRanges;
        int p = _comm.Size;
        var count = new float[p];
        _comm.AllGather([LocalTokenRanges.Count], count);
        var counts = count.Select(c => 4 * (int)c).ToArray();
        // Each int as two exact 16-bit halves.
        var mine = LocalTokenRanges.SelectMany(r => new float[] { r.Start >> 16, r.Start & 0xFFFF, r.Count >> 16, r.Count & 0xFFFF }).ToArray();
        var all = new float[counts.Sum()];
        _comm.AllGatherVariable(mine, all, counts);
        var result = new IReadOnlyList<(int Start, int Count)>[p];
        int at = 0;
        for (int r = 0; r < p; r++)
        {
            var list = new List<(int, int)>();
            for (int i = 0; i < counts[r]; i += 4, at += 4)
                list.Add((((int)all[at] << 16) | (int)all[at + 1], ((int)all[at + 2] << 16) | (int)all[at + 3]));
            result[r] = list;
        }
        return _allRanges = result;
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(_disposed, this);
}

/// <summary>One pooled instance of the scheme (its saved tensors) and, for copying contexts, its input copies.</summary>
internal sealed class SchemeSlot(IScheme scheme) : IDisposable
{
    private DeviceTensor[]? _copies;

    public IScheme Scheme { get; } = scheme;

    public bool Busy { get; set; }

    /// <summary>Forward passes run on this instance (its saved tensors are the last one's).</summary>
    public long Forwards { get; private set; }

    public void Forward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o)
    {
        Forwards++;
        Scheme.Forward(q, k, v, o);
    }

    /// <summary>q, k, v, o copies <c>[B,Nloc,…]</c>, made the first time and reused.</summary>
    public DeviceTensor[] Copies(IKernelBackend backend, AttentionShape s, int n) => _copies ??=
    [
        backend.Allocate(s.Batch, n, s.Heads, s.HeadDim), backend.Allocate(s.Batch, n, s.KvHeads, s.HeadDim),
        backend.Allocate(s.Batch, n, s.KvHeads, s.ValueDim), backend.Allocate(s.Batch, n, s.Heads, s.ValueDim),
    ];

    public void Dispose()
    {
        Scheme.Dispose();
        foreach (var t in _copies ?? []) t.Dispose();
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
