namespace Distributed.Cli.Train;

/// <summary>
/// RMSNorm over the last axis (Zhang and Sennrich 2019): <c>y = g ⊙ x / rms(x)</c>, with
/// <c>rms(x) = sqrt(mean(x²) + ε)</c>; the gain g is optional (null: no gain).
/// </summary>
internal static class RmsNorm
{
    private const float Epsilon = 1e-5f;

    /// <summary>x, y <c>[rows, d]</c>; writes y and the per-row 1/rms into <paramref name="inverseRms"/> <c>[rows]</c>.</summary>
    public static void Forward(float[] x, int rows, int d, float[]? gain, int gainOffset, float[] y, float[] inverseRms)
    {
        for (int r = 0; r < rows; r++)
        {
            var xr = x.AsSpan(r * d, d);
            float inv = 1f / MathF.Sqrt(HostMath.Dot(xr, xr) / d + Epsilon);
            inverseRms[r] = inv;
            var yr = y.AsSpan(r * d, d);
            for (int i = 0; i < d; i++) yr[i] = xr[i] * inv * (gain is null ? 1f : gain[gainOffset + i]);
        }
    }

    /// <summary>
    /// Given dy <c>[rows, d]</c>, adds dx into <paramref name="dx"/> (or overwrites it when not
    /// <paramref name="accumulate"/>) and adds the gain's gradient into <paramref name="dGain"/>:
    /// with x̂ = x/rms, <c>dg += Σ_rows dy ⊙ x̂</c> and <c>dx = (ĝ − x̂ · mean(ĝ ⊙ x̂)) / rms</c>, ĝ = dy ⊙ g.
    /// </summary>
    public static void Backward(float[] x, int rows, int d, float[]? gain, int gainOffset, float[] inverseRms, float[] dy,
        float[] dx, bool accumulate, float[]? dGain, int dGainOffset)
    {
        Span<float> gHat = d <= 1024 ? stackalloc float[d] : new float[d];
        for (int r = 0; r < rows; r++)
        {
            var xr = x.AsSpan(r * d, d);
            var dyr = dy.AsSpan(r * d, d);
            float inv = inverseRms[r];
            float mean = 0f;
            for (int i = 0; i < d; i++)
            {
                float xh = xr[i] * inv;
                if (dGain is not null) dGain[dGainOffset + i] += dyr[i] * xh;
                gHat[i] = dyr[i] * (gain is null ? 1f : gain[gainOffset + i]);
                mean += gHat[i] * xh;
            }
            mean /= d;
            var dxr = dx.AsSpan(r * d, d);
            for (int i = 0; i < d; i++)
            {
                float v = (gHat[i] - xr[i] * inv * mean) * inv;
                dxr[i] = accumulate ? dxr[i] + v : v;
            }
        }
    }
}
