using System.Diagnostics;
using System.Globalization;

namespace Distributed.Cli.Run;

/// <summary>Peak resident memory of this process (Linux VmHWM; elsewhere the peak working set).</summary>
internal static class PeakMemory
{
    /// <summary>Bytes of the largest resident set this process has had so far.</summary>
    public static long ProcessPeakBytes()
    {
        try
        {
            foreach (string line in File.ReadLines("/proc/self/status"))
            {
                if (!line.StartsWith("VmHWM:", StringComparison.Ordinal)) continue;
                string kb = line["VmHWM:".Length..].Trim().Split(' ')[0];
                return long.Parse(kb, CultureInfo.InvariantCulture) * 1024;
            }
        }
        catch (IOException) { }
        catch (UnauthorizedAccessException) { }
        using var p = Process.GetCurrentProcess();
        return p.PeakWorkingSet64;
    }
}
