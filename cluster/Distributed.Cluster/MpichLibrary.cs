using System.Reflection;
using System.Runtime.InteropServices;

namespace Distributed.Cluster;

/// <summary>
/// All native MPI resolution lives here. MPI.NET 1.4.0 from NuGet P/Invokes Microsoft MPI's
/// <c>msmpi.dll</c>; MS-MPI's handle ABI is MPICH's, so on Linux that name is mapped to MPICH's library
/// (<c>libmpich.so.12</c> on Debian, <c>libmpi.so.12</c> in MPICH's own builds, Intel MPI, MVAPICH,
/// Cray MPICH). Open MPI has a different ABI and cannot work.
/// </summary>
public static class MpichLibrary
{
    /// <summary>Environment variable naming another MPICH-ABI library (a path or a soname).</summary>
    public const string LibraryVariable = "DSATTN_MPI_LIBRARY";

    private static readonly object Gate = new();
    private static IntPtr _handle;
    private static bool _installed;

    /// <summary>The native handle of the loaded library (zero before <see cref="Install"/>), for the calls
    /// <see cref="MpichNative"/> binds itself.</summary>
    internal static IntPtr Handle => _handle;

    /// <summary>The library that was loaded, once <see cref="Install"/> ran.</summary>
    public static string? LoadedName { get; private set; }

    /// <summary>
    /// Loads the MPICH-ABI library and routes MPI.NET's <c>msmpi.dll</c> imports to it. Idempotent.
    /// </summary>
    /// <exception cref="InvalidOperationException">No MPICH-ABI library could be loaded, or only Open MPI
    /// is installed; the message says what to install.</exception>
    public static void Install()
    {
        lock (Gate)
        {
            if (_installed) return;
            _handle = Load(out string name);
            LoadedName = name;
            NativeLibrary.SetDllImportResolver(typeof(MPI.Communicator).Assembly, Resolve);
            _installed = true;
        }
    }

    private static IntPtr Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath) =>
        libraryName.StartsWith("msmpi", StringComparison.OrdinalIgnoreCase) ? _handle : IntPtr.Zero;

    private static IntPtr Load(out string name)
    {
        string? custom = Environment.GetEnvironmentVariable(LibraryVariable);
        if (!string.IsNullOrWhiteSpace(custom))
        {
            if (NativeLibrary.TryLoad(custom, out IntPtr h)) { name = custom; return h; }
            throw new InvalidOperationException($"{LibraryVariable}={custom} could not be loaded. Point it at an MPICH-ABI library (MPICH, Intel MPI, MVAPICH, Cray MPICH), e.g. /usr/lib/x86_64-linux-gnu/libmpich.so.12, or unset it.");
        }
        foreach (string candidate in new[] { "libmpich.so.12", "libmpi.so.12" })
        {
            if (NativeLibrary.TryLoad(candidate, out IntPtr h)) { name = candidate; return h; }
        }
        string hint = NativeLibrary.TryLoad("libmpi.so.40", out IntPtr ompi)
            ? " Only Open MPI (libmpi.so.40) is installed; its ABI differs from MPICH's and MPI.NET cannot use it."
            : "";
        if (ompi != IntPtr.Zero) NativeLibrary.Free(ompi);
        throw new InvalidOperationException($"No MPICH-ABI MPI library found (tried libmpich.so.12, libmpi.so.12).{hint} Install MPICH: apt-get install mpich (or set {LibraryVariable} to an MPICH-ABI library).");
    }
}
