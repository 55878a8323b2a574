using Distributed.Cluster;
using Distributed.Kernels;

namespace Distributed.Cli.Train;

/// <summary>
/// The one place the model calls the distributed attention: one <see cref="SequenceParallelAttention"/> per
/// layer (each instance keeps its own forward for its backward), host arrays in and out. Q, K, V, O and their
/// gradients are <c>[B, Nloc, H, Dh]</c> in this rank's local token order. The device tensors are the layer's
/// own and are not touched between Forward and Backward, which is what the one-context API requires.
/// </summary>
internal sealed class LayerAttention : IDisposable
{
    private readonly SequenceParallelAttention _attention;
    private readonly DeviceTensor _q, _k, _v, _o, _dO, _dQ, _dK, _dV;

    public LayerAttention(ICommunicator communicator, IKernelBackend backend, AttentionShape shape, SequenceParallelOptions options)
    {
        _attention = new SequenceParallelAttention(communicator, backend, shape, options);
        int n = _attention.LocalTokens;
        int[] dims = [shape.Batch, n, shape.Heads, shape.HeadDim];
        _q = backend.Allocate(dims);
        _k = backend.Allocate(dims);
        _v = backend.Allocate(dims);
        _o = backend.Allocate(dims);
        _dO = backend.Allocate(dims);
        _dQ = backend.Allocate(dims);
        _dK = backend.Allocate(dims);
        _dV = backend.Allocate(dims);
    }

    /// <summary>The global token ranges this rank owns, in local order.</summary>
    public IReadOnlyList<(int Start, int Count)> LocalTokenRanges => _attention.LocalTokenRanges;

    /// <summary>o = Attention(q, k, v) on this rank's rows. Collective.</summary>
    public void Forward(float[] q, float[] k, float[] v, float[] o)
    {
        _q.CopyFromHost(q);
        _k.CopyFromHost(k);
        _v.CopyFromHost(v);
        _attention.Forward(_q, _k, _v, _o);
        _o.CopyToHost(o);
    }

    /// <summary>dQ, dK, dV (overwritten) of the last <see cref="Forward"/>, given dO. Collective.</summary>
    public void Backward(float[] dO, float[] dQ, float[] dK, float[] dV)
    {
        _dO.CopyFromHost(dO);
        _attention.Backward(_dO, _dQ, _dK, _dV);
        _dQ.CopyToHost(dQ);
        _dK.CopyToHost(dK);
        _dV.CopyToHost(dV);
    }

    public void Dispose()
    {
        foreach (var t in new[] { _q, _k, _v, _o, _dO, _dQ, _dK, _dV }) t.Dispose();
        _attention.Dispose();
    }
}
