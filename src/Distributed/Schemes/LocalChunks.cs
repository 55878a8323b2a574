using Distributed.Kernels;

namespace Distributed.Schemes;

/// <summary>
/// A local tensor <c>[B, Nloc, …]</c> seen as its token ranges (one for contiguous, two for zigzag),
/// each its own device tensor. With one range the local tensor is used as it is; with several, the
/// parts are views of it where the backend can alias them (<see cref="IKernelBackend.TryView"/>: no copy,
/// no extra memory, a Join has nothing to do), else device copies (made by CopySlice, reused from call to call).
/// </summary>
internal sealed class LocalChunks(IKernelBackend backend, IReadOnlyList<(int Start, int Count)> ranges) : IDisposable
{
    private readonly Dictionary<string, DeviceTensor[]> _parts = [];
    private readonly Dictionary<string, (DeviceTensor Local, DeviceTensor[] Views)> _views = [];

    public IReadOnlyList<(int Start, int Count)> Ranges => ranges;

    /// <summary>The parts of <paramref name="local"/>, refreshed from it (for inputs).</summary>
    public DeviceTensor[] Split(string key, DeviceTensor local)
    {
        if (ranges.Count == 1) return [local];
        if (Views(key, local) is { } views) return views;
        var parts = Parts(key, local);
        int offset = 0;
        for (int c = 0; c < ranges.Count; c++)
        {
            backend.CopySlice(local, offset, parts[c], 0, ranges[c].Count, 1);
            offset += ranges[c].Count;
        }
        return parts;
    }

    /// <summary>The parts for an output of <paramref name="local"/>'s shape (contents undefined).</summary>
    public DeviceTensor[] Output(string key, DeviceTensor local) => ranges.Count == 1 ? [local] : Views(key, local) ?? Parts(key, local);

    /// <summary>Writes the parts back into <paramref name="local"/> (for outputs).</summary>
    public void Join(DeviceTensor[] parts, DeviceTensor local)
    {
        if (ranges.Count == 1) return;
        int offset = 0;
        for (int c = 0; c < ranges.Count; c++)
        {
            if (IsView(parts[c], local)) { offset += ranges[c].Count; continue; }
            backend.CopySlice(parts[c], 0, local, offset, ranges[c].Count, 1);
            offset += ranges[c].Count;
        }
    }

    /// <summary>Views of <paramref name="local"/>'s ranges, cached per key and tensor; null when the backend cannot alias.</summary>
    private DeviceTensor[]? Views(string key, DeviceTensor local)
    {
        if (_views.TryGetValue(key, out var cached) && ReferenceEquals(cached.Local, local)) return cached.Views;
        var views = new DeviceTensor[ranges.Count];
        int offset = 0;
        for (int c = 0; c < ranges.Count; c++)
        {
            if (backend.TryView(local, offset, ranges[c].Count) is not { } view) return null;
            views[c] = view;
            offset += ranges[c].Count;
        }
        _views[key] = (local, views);
        return views;
    }

    private bool IsView(DeviceTensor part, DeviceTensor local) =>
        _views.Values.Any(v => ReferenceEquals(v.Local, local) && Array.IndexOf(v.Views, part) >= 0);

    private DeviceTensor[] Parts(string key, DeviceTensor local)
    {
        int[] shape = [.. local.Shape];
        if (_parts.TryGetValue(key, out var parts) && parts[0].Shape.Skip(2).SequenceEqual(shape.Skip(2)) && parts[0].Shape[0] == shape[0])
            return parts;
        if (parts is not null) foreach (var p in parts) p.Dispose();
        parts = new DeviceTensor[ranges.Count];
        for (int c = 0; c < ranges.Count; c++)
        {
            var s = (int[])shape.Clone();
            s[1] = ranges[c].Count;
            parts[c] = backend.Allocate(s);
        }
        _parts[key] = parts;
        return parts;
    }

    public void Dispose()
    {
        foreach (var parts in _parts.Values)
            foreach (var p in parts) p.Dispose();
        _parts.Clear();
        _views.Clear(); // views own nothing
    }
}
