using static Distributed.Cluster.MpichNative;

namespace Distributed.Cluster;

/// <summary>How a started MPI collective advances while the rank that started it computes.</summary>
public enum MpiProgressMode
{
    /// <summary>One progress thread per process tests every started request, backing off with naps while
    /// nothing completes (the default). Needs MPI_THREAD_MULTIPLE, which <see cref="MpiCommunicator.RunWorld"/>
    /// asks for.</summary>
    Thread,

    /// <summary>No progress thread: a started collective advances only inside MPI calls (its Wait, or other
    /// collectives), unless MPICH's own asynchronous progress is on (<c>MPIR_CVAR_ASYNC_PROGRESS=1</c>).</summary>
    Off,
}

/// <summary>
/// The progress thread of <see cref="MpiProgressMode.Thread"/>. MPICH moves the data of a started collective
/// only while some thread of the process is inside an MPI call; without one, a rank that computes between
/// start and Wait finds the whole transfer still to do when it waits (and its peers' transfers stall on
/// it). This thread owns every started request from its start to its completion: it calls MPI_Testall on
/// each (never concurrently with another thread on the same request), and signals the request's event when
/// it completes, so <see cref="CommRequest.Wait"/> blocks in the kernel instead of polling. While requests
/// are outstanding and nothing completes, it backs off: a few yields, then nanosleep from
/// <see cref="FirstNapNs"/> doubling to <see cref="MaxNapNs"/> (each test resets the nap when a request
/// completed). With nothing outstanding it sleeps on a semaphore and uses no CPU.
/// MPICH's alternative, <c>MPIR_CVAR_ASYNC_PROGRESS=1</c> (with <see cref="MpiProgressMode.Off"/>), runs a
/// thread that polls without sleeping, a whole core per rank; see docs for the measured comparison.
/// </summary>
internal static unsafe class MpiProgress
{
    /// <summary>The environment variable that picks the mode: <c>thread</c> (default) or <c>off</c>.</summary>
    public const string EnvironmentVariable = "DSATTN_MPI_PROGRESS";

    private const int YieldTests = 8;
    /// <summary>First nap after the yields, in nanoseconds.</summary>
    internal const long FirstNapNs = 20_000;
    /// <summary>Longest nap between two tests, in nanoseconds: bounds the delay a completed transfer (or one
    /// step of a multi-step collective algorithm) waits to be noticed, and sets the thread's cost while a
    /// request is outstanding (one wake-up per nap). <c>DSATTN_MPI_PROGRESS_NAP_US</c> overrides it.</summary>
    internal static long MaxNapNs { get; private set; } = 200_000;

    private static long NapFromEnvironment()
    {
        string? value = System.Environment.GetEnvironmentVariable("DSATTN_MPI_PROGRESS_NAP_US");
        if (value is null) return MaxNapNs;
        if (!double.TryParse(value, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double us) || !(us >= 1) || us > 1e6)
            throw new InvalidOperationException($"DSATTN_MPI_PROGRESS_NAP_US={value} is not a nap: give microseconds between 1 and 1000000, e.g. 200.");
        return (long)(us * 1000);
    }

    private static readonly object Gate = new();
    private static readonly List<Entry> Pending = [];
    private static readonly SemaphoreSlim Work = new(0);
    private static System.Threading.Thread? s_thread;
    private static MpiProgressMode s_mode = MpiProgressMode.Off;

    /// <summary>The mode in force (set once by <see cref="MpiCommunicator.RunWorld"/>).</summary>
    public static MpiProgressMode Mode => s_mode;

    /// <summary>The mode <see cref="EnvironmentVariable"/> asks for (and the nap cap DSATTN_MPI_PROGRESS_NAP_US
    /// sets); a bad value is refused naming the fix.</summary>
    public static MpiProgressMode Requested()
    {
        MaxNapNs = NapFromEnvironment();
        string? value = System.Environment.GetEnvironmentVariable(EnvironmentVariable);
        return value?.Trim().ToLowerInvariant() switch
        {
            null or "" or "thread" => MpiProgressMode.Thread,
            "off" => MpiProgressMode.Off,
            _ => throw new InvalidOperationException($"{EnvironmentVariable}={value} is not a progress mode: use 'thread' (a progress thread, the default) or 'off' (progress only inside MPI calls)."),
        };
    }

    /// <summary>Sets the mode once MPI is initialised with the thread level it needs.</summary>
    internal static void Configure(MpiProgressMode mode) => s_mode = mode;

    /// <summary>A started request handed to the progress thread.</summary>
    internal sealed class Entry(int[] handles, MpiStatus[] statuses)
    {
        public readonly int[] Handles = handles;
        public readonly MpiStatus[] Statuses = statuses;
        public readonly ManualResetEventSlim Done = new(false, spinCount: 1);
        public Exception? Error;
    }

    /// <summary>Hands <paramref name="handles"/> (already started) to the progress thread; the caller must not
    /// touch them until <see cref="Entry.Done"/> is set, after which they are MPI_REQUEST_NULL and
    /// <see cref="Entry.Statuses"/> holds their statuses.</summary>
    public static Entry Track(int[] handles)
    {
        var entry = new Entry(handles, new MpiStatus[handles.Length]);
        lock (Gate)
        {
            if (s_thread is null)
            {
                s_thread = new System.Threading.Thread(Loop) { IsBackground = true, Name = "MPI progress" };
                s_thread.Start();
            }
            Pending.Add(entry);
        }
        Work.Release();
        return entry;
    }

    private static void Loop()
    {
        var local = new List<Entry>();
        while (true)
        {
            Work.Wait();
            // Drain the semaphore: one wake-up per Track call, but one pass serves them all.
            while (Work.Wait(0)) { }
            long nap = FirstNapNs;
            int idleTests = 0;
            while (true)
            {
                lock (Gate)
                {
                    local.Clear();
                    local.AddRange(Pending);
                }
                if (local.Count == 0) break;
                bool completed = false;
                foreach (var entry in local)
                {
                    if (!TestEntry(entry)) continue;
                    completed = true;
                    lock (Gate) Pending.Remove(entry);
                    entry.Done.Set();
                }
                if (completed)
                {
                    nap = FirstNapNs;
                    idleTests = 0;
                    continue;
                }
                // Nothing completed: give the core away, briefly at first, then in growing naps.
                if (idleTests++ < YieldTests) System.Threading.Thread.Yield();
                else
                {
                    Nap(nap);
                    nap = Math.Min(2 * nap, MaxNapNs);
                }
            }
        }
    }

    private static bool TestEntry(Entry entry)
    {
        try
        {
            fixed (int* h = entry.Handles)
            fixed (MpiStatus* s = entry.Statuses)
                return TestAll(entry.Handles.Length, h, s);
        }
        catch (Exception e)
        {
            entry.Error = e;
            return true;
        }
    }
}
