using Distributed.Cluster;
using Distributed.IO;
using Distributed.Kernels;

namespace Distributed.Cli.Run;

/// <summary>
/// The .npy outputs of one run, written atomically: rank 0 creates one temporary file per output beside
/// its target (named after the job), every rank writes its own rows into it at their offsets, and the
/// temporaries are renamed onto the targets only after a collective verdict that every rank succeeded.
/// Any failure deletes them, and an existing target is never touched before the rename.
/// </summary>
internal sealed class RunOutputs : IDisposable
{
    private readonly AtomicOutputs _atomic;
    private readonly Dictionary<string, (string Target, NpyWriter Writer)> _writers = [];
    private readonly List<string> _targets = [];
    private bool _finished;

    private RunOutputs(AtomicOutputs atomic)
    {
        _atomic = atomic;
    }

    /// <summary>
    /// Collective: rank 0 removes stale temporaries of earlier jobs and creates this job's temporaries
    /// (global shapes, sparse); then every rank opens them for writing.
    /// </summary>
    public static RunOutputs Begin(ICommunicator comm, RunFiles files, string jobId, AttentionShape shape)
    {
        var outputs = files.Outputs;
        var atomic = new AtomicOutputs([.. outputs.Select(o => o.Path)], jobId);
        var result = new RunOutputs(atomic);
        try
        {
            var failed = new float[1];
            if (comm.Rank == 0)
            {
                try
                {
                    atomic.Prepare();
                    foreach (var (tensor, path) in outputs)
                        using (NpyWriter.Create(atomic.TempPath(path), GlobalShape(tensor, shape))) { }
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    atomic.Abort();
                    failed[0] = 1;
                    comm.AllReduceSum(failed, failed);
                    throw;
                }
            }
            comm.AllReduceSum(failed, failed);
            if (failed[0] != 0) throw new IOException("rank 0 could not create the output files (see its message).");
            foreach (var (tensor, path) in outputs)
            {
                result._writers[tensor] = (path, NpyWriter.Open(atomic.TempPath(path)));
                result._targets.Add(path);
            }
            return result;
        }
        catch
        {
            result.Dispose();
            throw;
        }
    }

    /// <summary>True when <paramref name="tensor"/> (O, LSE, dQ, dK, dV) is to be written.</summary>
    public bool Wants(string tensor) => _writers.ContainsKey(tensor);

    /// <summary>Writes this rank's rows of <paramref name="tensor"/>; see <see cref="TensorStreams.Store"/> for outer and inner.</summary>
    public void Write(TensorStreams streams, string tensor, DeviceTensor local, IReadOnlyList<(int Start, int Count)> ranges, long outer, long seqLen, long inner)
    {
        if (!_writers.TryGetValue(tensor, out var w)) return;
        streams.Store(local, ranges, outer, seqLen, inner, w.Writer);
    }

    /// <summary>
    /// Collective: closes this rank's writers and agrees whether every rank succeeded; if so, rank 0
    /// renames the temporaries onto the targets, otherwise it deletes them. Returns the verdict.
    /// </summary>
    public bool Finish(ICommunicator comm, bool thisRankSucceeded)
    {
        foreach (var (_, writer) in _writers.Values) writer.Flush();
        CloseWriters();
        var failures = new float[] { thisRankSucceeded ? 0f : 1f };
        comm.AllReduceSum(failures, failures);
        bool all = failures[0] == 0f;
        if (comm.Rank == 0)
        {
            if (all) _atomic.Commit();
            else _atomic.Abort();
        }
        comm.Barrier();
        _finished = true;
        return all;
    }

    /// <summary>After a failure: closes the writers and deletes this job's temporaries (any rank may call it).</summary>
    public void Abort()
    {
        CloseWriters();
        if (!_finished) _atomic.Abort();
        _finished = true;
    }

    /// <summary>The targets, for the summary.</summary>
    public IReadOnlyList<string> Targets => _targets;

    private static long[] GlobalShape(string tensor, AttentionShape s) => tensor switch
    {
        "O" => [s.Batch, s.SeqLen, s.Heads, s.ValueDim],
        "LSE" => [s.Batch, s.Heads, s.SeqLen],
        "dQ" => [s.Batch, s.SeqLen, s.Heads, s.HeadDim],
        "dK" => [s.Batch, s.SeqLen, s.KvHeads, s.HeadDim],
        "dV" => [s.Batch, s.SeqLen, s.KvHeads, s.ValueDim],
        _ => throw new ArgumentOutOfRangeException(nameof(tensor), tensor, "Unknown output tensor."),
    };

    private void CloseWriters()
    {
        foreach (var (_, writer) in _writers.Values) writer.Dispose();
        _writers.Clear();
    }

    public void Dispose()
    {
        if (!_finished) Abort();
        else CloseWriters();
    }
}
