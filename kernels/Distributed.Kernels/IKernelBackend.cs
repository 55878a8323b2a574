namespace Distributed.Kernels;

/// <summary>
/// The block operations of one device. The parallel schemes call only these. A backend owns its tensors
/// (<see cref="DeviceTensor"/>): plain arrays on the CPU, device buffers for ILGPU. Operations write into
/// tensors the caller allocated, so a steady-state step allocates nothing.
/// </summary>
/// <remarks>
/// Layouts (row-major): Q <c>[B, Nq, H, D]</c>; K <c>[B, Nk, Hk, D]</c>; V <c>[B, Nk, Hk, Dv]</c>;
/// O and dO <c>[B, Nq, H, Dv]</c>; LSE and Drow <c>[B, H, Nq]</c>; linear-attention states
/// <c>[B, H, D, Dv]</c>. GQA: <c>H % Hk == 0</c>, query head h reads KV head <c>h / (H / Hk)</c>.
/// Positions are global: causal masking lets query i see key j iff
/// <c>kOffset + j &lt;= qOffset + i</c>.
/// </remarks>
public interface IKernelBackend : IDisposable
{
    /// <summary>Short name, e.g. "cpu" or "ilgpu-cpu" or "ilgpu-cuda".</summary>
    string Name { get; }

    /// <summary>Allocates a zero-filled tensor of the given shape.</summary>
    DeviceTensor Allocate(params int[] shape);

    /// <summary>Sets every element of <paramref name="tensor"/> to zero.</summary>
    void Clear(DeviceTensor tensor);

    /// <summary>
    /// Copies a slab along one axis: treating both tensors as <c>[outer, shape[axis], inner]</c>, copies
    /// indices <c>[srcStart, srcStart + count)</c> of <paramref name="source"/> to
    /// <c>[dstStart, dstStart + count)</c> of <paramref name="destination"/>. All other dims must match.
    /// Used to split and join zigzag chunks on the device.
    /// </summary>
    void CopySlice(DeviceTensor source, int srcStart, DeviceTensor destination, int dstStart, int count, int axis);

    /// <summary>
    /// A tensor that aliases tokens <c>[start, start + count)</c> (axis 1) of <paramref name="source"/>
    /// without copying, or null when this backend cannot alias them (callers then copy with
    /// <see cref="CopySlice"/>). Aliasing needs every dimension before axis 1 to be 1, so the rows are one
    /// contiguous run. The view reads and writes the source's memory, is valid only while the source lives,
    /// and disposing it frees nothing. The default returns null.
    /// </summary>
    DeviceTensor? TryView(DeviceTensor source, int start, int count) => null;

    /// <summary>
    /// Softmax attention forward over one K/V block: writes O <c>[B,Nq,H,Dv]</c> and LSE <c>[B,H,Nq]</c>
    /// (natural log, of the scaled scores). A row that sees no key gets LSE = -inf and O = 0.
    /// </summary>
    void FlashForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor o, DeviceTensor lse, in FlashOptions options);

    /// <summary>Drow[b,h,i] = Σ_c dO[b,i,h,c]·O[b,i,h,c]; the softmax-backward row term, <c>[B,H,Nq]</c>.</summary>
    void SoftmaxRowDot(DeviceTensor o, DeviceTensor dO, DeviceTensor drow);

    /// <summary>
    /// Softmax attention backward over one K/V block, given the <b>global</b> row LSE and Drow (so it is
    /// exact on a partial KV shard). Writes (or, with <see cref="FlashOptions.Accumulate"/>, adds to)
    /// dQ <c>[B,Nq,H,D]</c>, dK <c>[B,Nk,Hk,D]</c>, dV <c>[B,Nk,Hk,Dv]</c>; GQA gradients are summed over the
    /// query heads that share a KV head.
    /// </summary>
    void FlashBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, DeviceTensor lse, DeviceTensor drow, DeviceTensor dO,
        DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, in FlashOptions options);

    /// <summary>
    /// Merges partial softmax state b into a, in place: <c>LSE = LSE_a + log(1 + exp(LSE_b − LSE_a))</c>,
    /// <c>O = O_a − sigmoid(LSE_b − LSE_a)·(O_a − O_b)</c>. Rows with LSE = -inf carry weight 0.
    /// O <c>[B,N,H,Dv]</c>, LSE <c>[B,H,N]</c>.
    /// </summary>
    void MergeSoftmax(DeviceTensor oA, DeviceTensor lseA, DeviceTensor oB, DeviceTensor lseB);

    /// <summary>
    /// Lightning (linear) attention forward over one chunk of N tokens.
    /// Causal: <c>o_i = Σ_{j≤i} λ^(i−j) (q_i·k_j) v_j + λ^(i+1) q_i S0</c>, and
    /// <c>S_end = λ^N S0 + Σ_j λ^(N−1−j) k_jᵀ v_j</c>.
    /// Non-causal (decay ignored): <c>O = Q (S0 + Kᵀ V)</c>, <c>S_end = S0 + KᵀV</c>.
    /// <paramref name="s0"/> and <paramref name="sEnd"/> are <c>[B,H,D,Dv]</c> and may be null (zero / not wanted).
    /// <paramref name="decay"/> has H entries in (0, 1].
    /// </summary>
    void LightningForward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor o, DeviceTensor? sEnd);

    /// <summary>
    /// Backward of <see cref="LightningForward"/>. Given dO and the gradient dS_end of the outgoing state
    /// (null = 0), writes dQ, dK, dV and, when <paramref name="dS0"/> is not null, the gradient of the
    /// incoming state S0 <c>[B,H,D,Dv]</c>. GQA gradients are summed over the heads sharing a KV head.
    /// </summary>
    void LightningBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV, DeviceTensor? dS0);

    /// <summary>
    /// Local chunk state <c>M = Σ_j λ^(N−1−j) k_jᵀ v_j</c> <c>[B,H,D,Dv]</c> (λ = 1 when not causal).
    /// </summary>
    void LightningChunkState(DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal, DeviceTensor m);

    /// <summary>
    /// Backward mirror of the chunk state: <c>dM = Σ_i λ^(i+1) q_iᵀ dO_i</c> <c>[B,H,D,Dv]</c>
    /// (λ = 1 when not causal), the gradient reaching the incoming state from this chunk's outputs.
    /// </summary>
    void LightningChunkStateBackward(DeviceTensor q, DeviceTensor dO, ReadOnlySpan<float> decay, bool causal, DeviceTensor dM);

    /// <summary>Blocks until all queued work on the device has finished (no-op on the CPU).</summary>
    void Synchronize();

    /// <summary>
    /// The inter-chunk half of <see cref="LightningForward"/>: adds the incoming state's term to an output that
    /// was computed with <c>s0 = null</c>. Causal: <c>o_i += λ^(i+1) q_i S0</c> (i the row within the chunk);
    /// non-causal: <c>O += Q S0</c>. Splitting lets the intra-chunk part run before S0 is known (LASP-2 computes
    /// it while the state all-gather is in flight). Q <c>[B,N,H,D]</c>, S0 <c>[B,H,D,Dv]</c>, O <c>[B,N,H,Dv]</c>.
    /// </summary>
    void LightningInterChunkForward(DeviceTensor q, ReadOnlySpan<float> decay, bool causal, DeviceTensor s0, DeviceTensor o);

    /// <summary>
    /// The inter-chunk half of <see cref="LightningBackward"/>: adds to gradients that were computed with
    /// <c>s0 = null</c> and <c>dSEnd = null</c> the terms that need the incoming state and the outgoing state's
    /// gradient. Causal: <c>dq_i += λ^(i+1) dO_i S0ᵀ</c>, <c>dk_j += λ^(N−1−j) dS_end v_j</c>,
    /// <c>dv_j += λ^(N−1−j) dS_endᵀ k_j</c> (weights 1 when not causal); dK and dV sum over the query heads that
    /// share a KV head. Either state may be null (its terms are skipped). Shapes as in
    /// <see cref="LightningBackward"/>.
    /// </summary>
    void LightningInterChunkBackward(DeviceTensor q, DeviceTensor k, DeviceTensor v, ReadOnlySpan<float> decay, bool causal,
        DeviceTensor? s0, DeviceTensor dO, DeviceTensor? dSEnd, DeviceTensor dQ, DeviceTensor dK, DeviceTensor dV);
}

/// <summary>Options of the softmax block operations.</summary>
/// <param name="QueryOffset">Global position of the first query row.</param>
/// <param name="KeyOffset">Global position of the first key row.</param>
/// <param name="Causal">Mask keys after the query's position.</param>
/// <param name="Scale">Softmax scale; 0 or NaN means the default 1/sqrt(D).</param>
/// <param name="Accumulate">Backward only: add to dQ/dK/dV instead of overwriting them.</param>
public readonly record struct FlashOptions(long QueryOffset = 0, long KeyOffset = 0, bool Causal = false, float Scale = 0f, bool Accumulate = false)
{
    /// <summary>The scale actually used for head dim <paramref name="headDim"/>.</summary>
    public float ScaleFor(int headDim) => Scale > 0f ? Scale : 1f / MathF.Sqrt(headDim);
}

/// <summary>
/// A tensor owned by a backend. Its elements are fp32, row-major, with the given shape. Crossing to host
/// memory happens only through <see cref="CopyFromHost"/> and <see cref="CopyToHost"/>.
/// </summary>
public abstract class DeviceTensor : IDisposable
{
    /// <summary>Creates a tensor handle of the given shape.</summary>
    protected DeviceTensor(int[] shape)
    {
        ArgumentNullException.ThrowIfNull(shape);
        long n = 1;
        foreach (int d in shape)
        {
            if (d < 0) throw new ArgumentOutOfRangeException(nameof(shape), $"Tensor dimensions must be non-negative; got [{string.Join(",", shape)}].");
            n *= d;
        }
        Shape = (int[])shape.Clone();
        Length = n;
    }

    /// <summary>The dimensions, outermost first.</summary>
    public IReadOnlyList<int> Shape { get; }

    /// <summary>Number of elements.</summary>
    public long Length { get; }

    /// <summary>Copies <paramref name="source"/> into elements <c>[offset, offset + source.Length)</c>.</summary>
    public abstract void CopyFromHost(ReadOnlySpan<float> source, long offset = 0);

    /// <summary>Copies elements <c>[offset, offset + destination.Length)</c> into <paramref name="destination"/>.</summary>
    public abstract void CopyToHost(Span<float> destination, long offset = 0);

    /// <summary>Whether <see cref="Dispose()"/> has run (the storage is gone).</summary>
    public bool IsDisposed { get; private set; }

    /// <summary>Releases the storage.</summary>
    public void Dispose()
    {
        if (IsDisposed) return;
        IsDisposed = true;
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    /// <summary>Releases the storage.</summary>
    protected virtual void Dispose(bool disposing) { }

    /// <summary>Shape as text, e.g. <c>[1,128,8,64]</c>.</summary>
    public override string ToString() => $"[{string.Join(",", Shape)}]";
}
