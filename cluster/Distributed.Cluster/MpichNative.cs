using System.Runtime.InteropServices;

namespace Distributed.Cluster;

/// <summary>
/// The MPICH C calls MPI.NET 1.4.0 does not offer (non-blocking collectives) or offers only over managed
/// arrays, bound by hand to the library <see cref="MpichLibrary"/> loaded. Every native declaration of the
/// communicator lives in this file. Handles follow MPICH's ABI (mpi.h of MPICH 4.0, shared by Intel MPI,
/// MVAPICH and Cray MPICH): communicators, datatypes, ops and requests are ints, and <c>MPI_Status</c> is
/// five ints. Nothing here needs mpi.h at run time.
/// </summary>
internal static unsafe class MpichNative
{
    /// <summary>MPI_COMM_WORLD.</summary>
    public const int CommWorld = 0x44000000;
    /// <summary>MPI_COMM_NULL.</summary>
    public const int CommNull = 0x04000000;
    /// <summary>MPI_FLOAT.</summary>
    public const int Float = 0x4c00040a;
    /// <summary>MPI_SUM.</summary>
    public const int Sum = 0x58000003;
    /// <summary>MPI_REQUEST_NULL.</summary>
    public const int RequestNull = 0x2c000000;
    /// <summary>MPI_IN_PLACE: <c>(void*)-1</c>.</summary>
    public static readonly void* InPlace = (void*)-1;
    /// <summary>MPI_STATUS_IGNORE and MPI_STATUSES_IGNORE: <c>(MPI_Status*)1</c>.</summary>
    public static readonly MpiStatus* StatusIgnore = (MpiStatus*)1;

    private const int Success = 0;
    private const int ErrInStatus = 17;
    private const int MaxErrorString = 512;

    /// <summary>MPICH's MPI_Status: count_lo, count_hi_and_cancelled, MPI_SOURCE, MPI_TAG, MPI_ERROR.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct MpiStatus
    {
        public int CountLo;
        public int CountHiAndCancelled;
        public int Source;
        public int Tag;
        public int Error;
    }

    private static readonly object Gate = new();
    private static Api* _api;

    /// <summary>The resolved entry points (resolved once, after <see cref="MpichLibrary.Install"/>).</summary>
    private struct Api
    {
        public delegate* unmanaged<void*, int, int, void*, int, int, int, int*, int> Iallgather;
        public delegate* unmanaged<void*, int, int, void*, int*, int*, int, int, int*, int> Iallgatherv;
        public delegate* unmanaged<void*, void*, int, int, int, int, int*, int> Iallreduce;
        public delegate* unmanaged<void*, void*, int, int, int, int, int*, int> IreduceScatterBlock;
        public delegate* unmanaged<void*, int, int, void*, int, int, int, int*, int> Ialltoall;
        public delegate* unmanaged<int, int*, int> Ibarrier;
        public delegate* unmanaged<void*, int, int, int, int, int, int*, int> Isend;
        public delegate* unmanaged<void*, int, int, int, int, int, int*, int> Irecv;
        public delegate* unmanaged<int, int*, int*, MpiStatus*, int> Testall;
        public delegate* unmanaged<MpiStatus*, int, int*, int> GetCount;
        public delegate* unmanaged<int, int*, int> CommRank;
        public delegate* unmanaged<int, int*, int> CommSize;
        public delegate* unmanaged<int, int, int, int*, int> CommSplit;
        public delegate* unmanaged<int*, int> CommFree;
        public delegate* unmanaged<int, byte*, int*, int> ErrorString;
    }

    private static ref Api Calls
    {
        get
        {
            if (_api is null) Resolve();
            return ref *_api;
        }
    }

    private static void Resolve()
    {
        lock (Gate)
        {
            if (_api is not null) return;
            IntPtr lib = MpichLibrary.Handle;
            if (lib == IntPtr.Zero) throw new InvalidOperationException("MPI is not loaded: call MpichLibrary.Install (MpiCommunicator.RunWorld does) first.");
            var api = (Api*)NativeMemory.AllocZeroed((nuint)sizeof(Api));
            api->Iallgather = (delegate* unmanaged<void*, int, int, void*, int, int, int, int*, int>)Export(lib, "MPI_Iallgather");
            api->Iallgatherv = (delegate* unmanaged<void*, int, int, void*, int*, int*, int, int, int*, int>)Export(lib, "MPI_Iallgatherv");
            api->Iallreduce = (delegate* unmanaged<void*, void*, int, int, int, int, int*, int>)Export(lib, "MPI_Iallreduce");
            api->IreduceScatterBlock = (delegate* unmanaged<void*, void*, int, int, int, int, int*, int>)Export(lib, "MPI_Ireduce_scatter_block");
            api->Ialltoall = (delegate* unmanaged<void*, int, int, void*, int, int, int, int*, int>)Export(lib, "MPI_Ialltoall");
            api->Ibarrier = (delegate* unmanaged<int, int*, int>)Export(lib, "MPI_Ibarrier");
            api->Isend = (delegate* unmanaged<void*, int, int, int, int, int, int*, int>)Export(lib, "MPI_Isend");
            api->Irecv = (delegate* unmanaged<void*, int, int, int, int, int, int*, int>)Export(lib, "MPI_Irecv");
            api->Testall = (delegate* unmanaged<int, int*, int*, MpiStatus*, int>)Export(lib, "MPI_Testall");
            api->GetCount = (delegate* unmanaged<MpiStatus*, int, int*, int>)Export(lib, "MPI_Get_count");
            api->CommRank = (delegate* unmanaged<int, int*, int>)Export(lib, "MPI_Comm_rank");
            api->CommSize = (delegate* unmanaged<int, int*, int>)Export(lib, "MPI_Comm_size");
            api->CommSplit = (delegate* unmanaged<int, int, int, int*, int>)Export(lib, "MPI_Comm_split");
            api->CommFree = (delegate* unmanaged<int*, int>)Export(lib, "MPI_Comm_free");
            api->ErrorString = (delegate* unmanaged<int, byte*, int*, int>)Export(lib, "MPI_Error_string");
            _api = api;
        }
    }

    private static IntPtr Export(IntPtr lib, string name) =>
        NativeLibrary.TryGetExport(lib, name, out IntPtr f) ? f
            : throw new InvalidOperationException($"{MpichLibrary.LoadedName} has no {name}; an MPI-3 (or newer) MPICH-ABI library is needed (MPICH ≥ 3.0, Intel MPI, MVAPICH, Cray MPICH).");

    /// <summary>Throws with MPI's own message when <paramref name="code"/> is not MPI_SUCCESS.</summary>
    public static void Check(int code, string call)
    {
        if (code != Success) throw new InvalidOperationException($"{call} failed: {ErrorText(code)}");
    }

    /// <summary>MPI's text for an error code.</summary>
    public static string ErrorText(int code)
    {
        byte* text = stackalloc byte[MaxErrorString + 1];
        int length = 0;
        if (Calls.ErrorString(code, text, &length) != Success) return $"MPI error {code}";
        return $"{Marshal.PtrToStringAnsi((IntPtr)text, Math.Clamp(length, 0, MaxErrorString))} (MPI error {code})";
    }

    public static int CommRank(int comm)
    {
        int rank;
        Check(Calls.CommRank(comm, &rank), "MPI_Comm_rank");
        return rank;
    }

    public static int CommSize(int comm)
    {
        int size;
        Check(Calls.CommSize(comm, &size), "MPI_Comm_size");
        return size;
    }

    public static int CommSplit(int comm, int color, int key)
    {
        int created;
        Check(Calls.CommSplit(comm, color, key, &created), "MPI_Comm_split");
        return created;
    }

    public static void CommFree(ref int comm)
    {
        fixed (int* c = &comm) Check(Calls.CommFree(c), "MPI_Comm_free");
    }

    public static void Iallgather(void* send, int sendCount, void* receive, int receiveCount, int comm, int* request) =>
        Check(Calls.Iallgather(send, sendCount, Float, receive, receiveCount, Float, comm, request), "MPI_Iallgather");

    public static void Iallgatherv(void* send, int sendCount, void* receive, int* counts, int* displacements, int comm, int* request) =>
        Check(Calls.Iallgatherv(send, sendCount, Float, receive, counts, displacements, Float, comm, request), "MPI_Iallgatherv");

    public static void IallreduceSum(void* send, void* receive, int count, int comm, int* request) =>
        Check(Calls.Iallreduce(send, receive, count, Float, Sum, comm, request), "MPI_Iallreduce");

    public static void IreduceScatterBlockSum(void* send, void* receive, int receiveCount, int comm, int* request) =>
        Check(Calls.IreduceScatterBlock(send, receive, receiveCount, Float, Sum, comm, request), "MPI_Ireduce_scatter_block");

    public static void Ialltoall(void* send, int sendCount, void* receive, int receiveCount, int comm, int* request) =>
        Check(Calls.Ialltoall(send, sendCount, Float, receive, receiveCount, Float, comm, request), "MPI_Ialltoall");

    public static void Ibarrier(int comm, int* request) => Check(Calls.Ibarrier(comm, request), "MPI_Ibarrier");

    public static void Isend(void* send, int count, int destination, int tag, int comm, int* request) =>
        Check(Calls.Isend(send, count, Float, destination, tag, comm, request), "MPI_Isend");

    public static void Irecv(void* receive, int count, int source, int tag, int comm, int* request) =>
        Check(Calls.Irecv(receive, count, Float, source, tag, comm, request), "MPI_Irecv");

    /// <summary>MPI_Testall: true when every request completed (each is then MPI_REQUEST_NULL).</summary>
    public static bool TestAll(int count, int* requests, MpiStatus* statuses)
    {
        int done;
        int code = Calls.Testall(count, requests, &done, statuses);
        if (code == ErrInStatus && statuses != StatusIgnore)
        {
            for (int i = 0; i < count; i++)
                if (statuses[i].Error != Success) Check(statuses[i].Error, "MPI_Testall");
        }
        Check(code, "MPI_Testall");
        return done != 0;
    }

    /// <summary>Floats received, per the status of a completed receive.</summary>
    public static int ReceivedFloats(MpiStatus* status)
    {
        int count;
        Check(Calls.GetCount(status, Float, &count), "MPI_Get_count");
        return count;
    }

    /// <summary>Sleeps the calling thread for about <paramref name="nanoseconds"/> (libc nanosleep:
    /// <see cref="Thread.Sleep(int)"/> cannot sleep less than a millisecond).</summary>
    public static void Nap(long nanoseconds)
    {
        var t = new TimeSpec { Seconds = nanoseconds / 1_000_000_000, Nanoseconds = nanoseconds % 1_000_000_000 };
        _ = nanosleep(&t, null);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct TimeSpec
    {
        public long Seconds;
        public long Nanoseconds;
    }

    [DllImport("libc", EntryPoint = "nanosleep")]
    private static extern int nanosleep(TimeSpec* request, TimeSpec* remaining);
}
