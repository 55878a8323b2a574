namespace Distributed.Kernels.Cpu;

/// <summary>
/// Work distribution and per-thread scratch. Tasks are handed out one at a time from a shared counter,
/// heaviest first, so causal work (whose cost grows along the sequence) stays balanced across threads.
/// </summary>
internal static unsafe class CpuParallel
{
    // Per-thread scratch of a few 64-row tiles: native, freed by the finalizer when the thread ends.
    [ThreadStatic] private static NativeBuffer? _scratch;

    /// <summary>
    /// Runs <paramref name="body"/> for every task index in [0, count) on up to <paramref name="threads"/>
    /// threads. <paramref name="order"/>, when given, lists the task indices in the order to hand them out.
    /// </summary>
    public static void For(int count, int threads, Action<int> body, int[]? order = null)
    {
        if (count <= 0) return;
        int workers = Math.Min(threads, count);
        if (workers <= 1)
        {
            for (int i = 0; i < count; i++) body(order is null ? i : order[i]);
            return;
        }
        int next = -1;
        Parallel.For(0, workers, new ParallelOptions { MaxDegreeOfParallelism = workers }, _ =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < count) body(order is null ? i : order[i]);
        });
    }

    /// <summary>
    /// Like <see cref="For(int, int, Action{int}, int[])"/>, but <paramref name="body"/> also gets the index of
    /// the worker running it, in [0, <see cref="Workers"/>(count, threads)): a worker may own a private
    /// accumulator that no other worker writes. The assignment is static (worker w runs positions w, w + W,
    /// w + 2W, … of the order, in that order), so what each worker accumulates, and in which order, does not
    /// depend on timing: results are bitwise reproducible for a given thread count. With the tasks ordered
    /// heaviest first, the round-robin keeps the workers within one task of each other.
    /// </summary>
    public static void ForWorkers(int count, int threads, Action<int, int> body, int[]? order = null)
    {
        if (count <= 0) return;
        int workers = Workers(count, threads);
        if (workers <= 1)
        {
            for (int i = 0; i < count; i++) body(order is null ? i : order[i], 0);
            return;
        }
        Parallel.For(0, workers, new ParallelOptions { MaxDegreeOfParallelism = workers }, w =>
        {
            for (int i = w; i < count; i += workers) body(order is null ? i : order[i], w);
        });
    }

    /// <summary>How many workers <see cref="ForWorkers"/> starts for <paramref name="count"/> tasks.</summary>
    public static int Workers(int count, int threads) => Math.Max(1, Math.Min(threads, count));

    /// <summary>This thread's scratch of at least <paramref name="floats"/> floats (pinned, reused, not cleared).</summary>
    public static float* Scratch(long floats)
    {
        if (_scratch is null || _scratch.Floats < floats)
        {
            _scratch?.Dispose();
            _scratch = new NativeBuffer(Math.Max(floats, 1 << 16), zero: false);
        }
        return _scratch.Pointer;
    }
}

/// <summary>
/// A grow-only native buffer owned by one backend (so concurrent in-process ranks never share it), freed
/// with the backend.
/// </summary>
internal sealed unsafe class PinnedBuffer : IDisposable
{
    private NativeBuffer? _data;

    /// <summary>At least <paramref name="floats"/> floats, reused from call to call (contents undefined).</summary>
    public float* Get(long floats)
    {
        if (_data is null || _data.Floats < floats)
        {
            _data?.Dispose();
            _data = null;
            _data = new NativeBuffer(Math.Max(floats, 1024), zero: false);
        }
        return _data.Pointer;
    }

    /// <summary>Frees the buffer; a later <see cref="Get"/> allocates again.</summary>
    public void Dispose()
    {
        _data?.Dispose();
        _data = null;
    }
}
