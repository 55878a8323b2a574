using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Train;

/// <summary>
/// The one place the model calls the distributed attention: one <see cref="SequenceParallelAttention"/> per
/// layer, through the library's host-memory overloads and a saved context. Q, K, V, O and their gradients are
/// <c>[B, Nloc, H, Dh]</c> in this rank's local token order. Forward copies q, k and v into a pooled context
/// (<see cref="SavedInputs.Copy"/>), so the model may reuse its arrays before Backward.
/// </summary>
internal sealed class LayerAttention : IDisposable
{
    private readonly SequenceParallelAttention _attention;
    private AttentionContext? _saved;

    public LayerAttention(ICommunicator communicator, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options)
    {
        _attention = new SequenceParallelAttention(communicator, backend, shape, options);
    }

    /// <summary>The global token ranges this rank owns, in local order.</summary>
    public IReadOnlyList<(int Start, int Count)> LocalTokenRanges => _attention.LocalTokenRanges;

    /// <summary>o = Attention(q, k, v) on this rank's rows; keeps the context for <see cref="Backward"/>. Collective.</summary>
    public void Forward(float[] q, float[] k, float[] v, float[] o)
    {
        _saved?.Dispose();
        _saved = _attention.Forward(q, k, v, o);
    }

    /// <summary>dQ, dK, dV (overwritten) of the last <see cref="Forward"/>, given dO; consumes its context. Collective.</summary>
    public void Backward(float[] dO, float[] dQ, float[] dK, float[] dV)
    {
        var saved = _saved ?? throw new InvalidOperationException("Backward needs the layer's Forward first.");
        _saved = null;
        _attention.Backward(saved, dO, dQ, dK, dV);
    }

    public void Dispose()
    {
        _saved?.Dispose();
        _attention.Dispose();
    }
}
