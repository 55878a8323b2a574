using Distributed.Kernels;

namespace Distributed;

/// <summary>
/// What one forward pass saved for its backward pass, returned by
/// <see cref="SequenceParallelAttention.Forward(DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor, SavedInputs)"/>.
/// <see cref="SequenceParallelAttention.Backward(AttentionContext, DeviceTensor, DeviceTensor, DeviceTensor, DeviceTensor, bool)"/>
/// consumes it; <see cref="Dispose"/> gives its pooled buffers back without a backward (inference, or a
/// checkpointed forward that will be recomputed). A consumed or disposed context refuses every further use.
/// Disposing a consumed context does nothing, so <c>using var ctx = …</c> is always safe.
/// </summary>
public sealed class AttentionContext : IDisposable
{
    private readonly (string Name, DeviceTensor Tensor, ulong Checksum)[]? _inputs;
    private State _state;

    private enum State { Ready, Consumed, Disposed }

    internal AttentionContext(SequenceParallelAttention owner, SchemeSlot slot, SavedInputs saved, (string, DeviceTensor, ulong)[]? inputs)
    {
        Owner = owner;
        Slot = slot;
        SavedInputs = saved;
        _inputs = inputs;
    }

    /// <summary>How the forward's inputs are kept.</summary>
    public SavedInputs SavedInputs { get; }

    /// <summary>Whether Backward has run on this context.</summary>
    public bool IsConsumed => _state == State.Consumed;

    /// <summary>Whether the context was disposed before a backward pass.</summary>
    public bool IsDisposed => _state == State.Disposed;

    internal SequenceParallelAttention Owner { get; }

    internal SchemeSlot Slot { get; }

    /// <summary>Returns the context's buffers to its layer's pool. Idempotent; a no-op after Backward.</summary>
    public void Dispose()
    {
        if (_state != State.Ready) return;
        _state = State.Disposed;
        Owner.Release(this);
    }

    internal void ThrowIfUnusable()
    {
        if (_state == State.Consumed)
            throw new InvalidOperationException("This context was consumed by Backward already: each Forward allows one Backward. Run Forward again (activation checkpointing recomputes it) for another backward pass.");
        if (_state == State.Disposed)
            throw new ObjectDisposedException(nameof(AttentionContext), "This context was disposed, which gave its saved tensors back to the pool; keep it alive until Backward has run.");
    }

    /// <summary>With <see cref="SavedInputs.Reference"/>: refuses if q, k, v or o changed or were disposed since the forward.</summary>
    internal void VerifyInputs()
    {
        if (_inputs is null) return;
        foreach (var (name, tensor, checksum) in _inputs)
        {
            if (tensor.IsDisposed)
                throw new InvalidOperationException($"{name} was disposed after Forward, but this context references it (SavedInputs.Reference); keep q, k, v and o alive until Backward, or pass SavedInputs.Copy to Forward.");
            if (TensorChecksum.Of(tensor) != checksum)
                throw new InvalidOperationException($"{name} changed after Forward, but this context references it (SavedInputs.Reference), so the gradients would not be those of the forward that ran; keep q, k, v and o unchanged until Backward, or pass SavedInputs.Copy to Forward.");
        }
    }

    internal void Consume()
    {
        _state = State.Consumed;
    }
}
