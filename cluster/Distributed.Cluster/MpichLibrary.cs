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

    /// <summary>The sonames tried, in order, when <see cref="LibraryVariable"/> is not set.</summary>
    public static IReadOnlyList<string> DefaultNames { get; } = ["libmpich.so.12", "libmpi.so.12"];

    /// <summary>
    /// Loads the MPICH-ABI library and routes MPI.NET's <c>msmpi.dll</c> imports to it. Idempotent.
    /// </summary>
    /// <exception cref="InvalidOperationException">No MPI library could be loaded, or the one found is not
    /// MPICH-ABI (Open MPI, or no <c>MPI_Get_library_version</c>); the message says what to install.</exception>
    public static void Install()
    {
        lock (Gate)
        {
            if (_installed) return;
            if (TryLoad(Environment.GetEnvironmentVariable(LibraryVariable), out IntPtr handle, out string name) is { } missing)
                throw new InvalidOperationException(missing);
            if (Classify(name, ReadVersion(handle)) is { } wrong)
            {
                NativeLibrary.Free(handle);
                throw new InvalidOperationException(wrong);
            }
            _handle = handle;
            LoadedName = name;
            NativeLibrary.SetDllImportResolver(typeof(MPI.Communicator).Assembly, Resolve);
            _installed = true;
        }
    }

    /// <summary>
    /// Checks, without initialising MPI, that the library the ranks would load (<see cref="LibraryVariable"/>, else
    /// <see cref="DefaultNames"/>) loads and is MPICH-ABI (<c>MPI_Get_library_version</c>, which MPI-3 allows before
    /// <c>MPI_Init</c>): a launcher calls this once, before any rank starts, so a missing or wrong library is reported
    /// once rather than by every rank.
    /// </summary>
    /// <returns>Null and the library's name and the first line of its version when it will do; otherwise the problem
    /// (the names or path tried and the fix).</returns>
    public static (string? Problem, string? Library, string? Version) Probe() => Probe(Environment.GetEnvironmentVariable(LibraryVariable));

    /// <summary>As <see cref="Probe()"/>, with the value of <see cref="LibraryVariable"/> given (null: not set).</summary>
    public static (string? Problem, string? Library, string? Version) Probe(string? custom)
    {
        if (TryLoad(custom, out IntPtr handle, out string name) is { } missing) return (missing, null, null);
        try
        {
            string? version = ReadVersion(handle);
            return (Classify(name, version), name, version is null ? null : FirstLine(version));
        }
        finally { NativeLibrary.Free(handle); }
    }

    /// <summary>
    /// Whether a library that reports <paramref name="version"/> (<c>MPI_Get_library_version</c>; null when it has
    /// no such function) speaks the MPICH ABI: MPICH, Intel MPI, MVAPICH and Cray MPICH do; Open MPI does not.
    /// </summary>
    /// <returns>Null when it does; otherwise the problem and the fix.</returns>
    public static string? Classify(string library, string? version)
    {
        ArgumentNullException.ThrowIfNull(library);
        const string Fix = "Install MPICH (apt-get install -y mpich) and launch with its mpiexec (mpiexec.mpich, or dsattn launch)";
        if (version is null)
            return $"{library} has no MPI_Get_library_version, so it is not an MPI-3 library. {Fix}, or set {LibraryVariable} to an MPICH-ABI library (MPICH, Intel MPI, MVAPICH, Cray MPICH).";
        if (version.Contains("Open MPI", StringComparison.OrdinalIgnoreCase))
            return $"{library} is Open MPI ('{FirstLine(version)}'); its ABI differs from MPICH's and MPI.NET here cannot use it. {Fix}; point {LibraryVariable} at libmpich.so.12 or unset it.";
        if (version.Contains("MPICH", StringComparison.OrdinalIgnoreCase) || version.Contains("Intel(R) MPI", StringComparison.OrdinalIgnoreCase)
            || version.Contains("MVAPICH", StringComparison.OrdinalIgnoreCase))
            return null;
        return $"{library} reports '{FirstLine(version)}', which is not an MPICH-ABI library (MPICH, Intel MPI, MVAPICH, Cray MPICH). {Fix}, or set {LibraryVariable} to such a library.";
    }

    private static string FirstLine(string text)
    {
        string line = string.Join(' ', text.Split('\n', 2)[0].Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries));
        return line.Length > 120 ? line[..120] + "..." : line;
    }

    private static IntPtr Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath) =>
        libraryName.StartsWith("msmpi", StringComparison.OrdinalIgnoreCase) ? _handle : IntPtr.Zero;

    /// <summary>Loads <paramref name="custom"/> (when set) or the first of <see cref="DefaultNames"/>; returns the
    /// problem, or null with the handle and name.</summary>
    private static string? TryLoad(string? custom, out IntPtr handle, out string name)
    {
        name = "";
        if (!string.IsNullOrWhiteSpace(custom))
        {
            name = custom;
            if (NativeLibrary.TryLoad(custom, out handle)) return null;
            string why = custom.Contains('/', StringComparison.Ordinal) && !File.Exists(custom) ? "no such file" : "the loader refused it (not a shared library for this machine, or a dependency is missing)";
            return $"{LibraryVariable}={custom} could not be loaded ({why}). Point it at an MPICH-ABI library (MPICH, Intel MPI, MVAPICH, Cray MPICH), e.g. /usr/lib/x86_64-linux-gnu/libmpich.so.12, or unset it; to install MPICH: apt-get install -y mpich.";
        }
        foreach (string candidate in DefaultNames)
        {
            if (NativeLibrary.TryLoad(candidate, out handle)) { name = candidate; return null; }
        }
        handle = IntPtr.Zero;
        string hint = NativeLibrary.TryLoad("libmpi.so.40", out IntPtr ompi)
            ? " Only Open MPI (libmpi.so.40) is installed; its ABI differs from MPICH's and MPI.NET cannot use it."
            : "";
        if (ompi != IntPtr.Zero) NativeLibrary.Free(ompi);
        return $"No MPICH-ABI MPI library found: tried {string.Join(" and ", DefaultNames)} through the dynamic loader (LD_LIBRARY_PATH, /etc/ld.so.cache, /lib, /usr/lib).{hint} " +
            $"Install MPICH: apt-get install -y mpich (or set {LibraryVariable} to an MPICH-ABI library's path).";
    }

    /// <summary>The library's <c>MPI_Get_library_version</c> text, or null when it has no such function.</summary>
    private static unsafe string? ReadVersion(IntPtr handle)
    {
        if (!NativeLibrary.TryGetExport(handle, "MPI_Get_library_version", out IntPtr f)) return null;
        // MPI_MAX_LIBRARY_VERSION_STRING is 8192 in MPICH and 256 in Open MPI; twice the larger is room enough.
        var buffer = new byte[16384];
        int length = 0;
        int rc;
        fixed (byte* p = buffer) rc = ((delegate* unmanaged<byte*, int*, int>)f)(p, &length);
        if (rc != 0) return "";
        length = Math.Clamp(length, 0, buffer.Length);
        int nul = Array.IndexOf(buffer, (byte)0, 0, length);
        return System.Text.Encoding.UTF8.GetString(buffer, 0, nul >= 0 ? nul : length);
    }
}
