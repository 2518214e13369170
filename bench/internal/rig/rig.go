// Package rig holds what the load programs under bench/ share: ports,
// the Caddyfile and the in-process Caddy in front of fakellm, the client
// side (requests, open- and closed-loop load, the drain), seeded arrivals,
// percentiles, and the plain-text report with its machine line.
package rig

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Adapt turns a Caddyfile into Caddy's JSON.
func Adapt(cf string) ([]byte, error) {
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		return nil, errors.New("caddyfile adapter not registered")
	}
	cfg, _, err := adapter.Adapt([]byte(cf), map[string]any{"filename": "Caddyfile"})
	return cfg, err
}

// Select returns the scenarios whose name is want, in order, or all of
// them when want is "all".
func Select[S any](all []S, want string, name func(S) string) []S {
	var selected []S
	for _, s := range all {
		if want == "all" || want == name(s) {
			selected = append(selected, s)
		}
	}
	return selected
}

// RNG returns the seeded generator of one stream of random draws, so that
// two configurations measured one after the other get the same schedule.
func RNG(seed, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(seed, stream))
}

// SleepUntil waits until t or until ctx ends, and reports whether ctx is
// still live.
func SleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Percentile returns the p-th percentile of sorted by the nearest-rank
// method, 0 when there is no sample.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// Pct formats n of `of` as a percentage, "–" when there is nothing.
func Pct(n, of int) string {
	if of == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f %%", 100*float64(n)/float64(of))
}

// MS formats a duration in milliseconds with one decimal.
func MS(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }

// LatCell is the p-th percentile of sorted for a table cell, "–" when
// there is no sample.
func LatCell(sorted []time.Duration, p float64) string {
	if len(sorted) == 0 {
		return "–"
	}
	return MS(Percentile(sorted, p))
}

// Verdict is a goal line's first word.
func Verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

// Header starts a scenario's report.
func Header(w io.Writer, title, params string) {
	fmt.Fprintf(w, "\n== %s ==\n%s\n\n", title, params)
}

// Table is a plain-text table of aligned columns.
type Table struct{ tw *tabwriter.Writer }

// NewTable starts a table with a header row of column labels after an
// empty corner cell.
func NewTable(w io.Writer, labels ...string) *Table {
	t := &Table{tw: tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)}
	t.Row(append([]string{""}, labels...)...)
	return t
}

// Row adds a row.
func (t *Table) Row(cells ...string) {
	fmt.Fprintln(t.tw, strings.Join(cells, "\t")+"\t")
}

// Flush writes the table out.
func (t *Table) Flush() { _ = t.tw.Flush() }

// Columns is a Table with one column per result: a row is a label, then
// one cell per result.
type Columns[R any] struct {
	*Table
	rs   []R
	note func(R) string
}

// NewColumns starts a Columns table over rs, headed by label(r) of each
// result. note(r) is what a result's cells say when it has no figures (it
// did not run), "" when it has them.
func NewColumns[R any](w io.Writer, rs []R, label, note func(R) string) *Columns[R] {
	labels := make([]string, len(rs))
	for i, r := range rs {
		labels[i] = label(r)
	}
	return &Columns[R]{Table: NewTable(w, labels...), rs: rs, note: note}
}

// Line adds a row: label, then f(r), or r's note, for each result r.
func (c *Columns[R]) Line(label string, f func(r R) string) {
	cells := []string{label}
	for _, r := range c.rs {
		if n := c.note(r); n != "" {
			cells = append(cells, n)
		} else {
			cells = append(cells, f(r))
		}
	}
	c.Row(cells...)
}

// PrintIntro prints the command that prog (a program under bench/) runs
// as, and the machine line.
func PrintIntro(w io.Writer, prog string) {
	fmt.Fprintf(w, "`%s`\n\n", strings.Join(append([]string{"go run ./bench/" + prog}, os.Args[1:]...), " "))
	fmt.Fprintf(w, "Machine: %s, nproc %d, CPU %s, GOMAXPROCS %d. Load generator, Caddy and the fake upstream share this one process.\n",
		runtime.Version(), runtime.NumCPU(), CPUModel(), runtime.GOMAXPROCS(0))
}

// PrintEnd prints the load average and the goroutine count, against
// goroutines at the start. Every run has stopped its Caddy, its fakellm
// and its load by now; SettleGoroutines gives closed connections'
// goroutines time to return.
func PrintEnd(w io.Writer, goroutines int) {
	end := SettleGoroutines(goroutines)
	fmt.Fprintf(w, "\nLoad average at the end: %s. Goroutines: %d at the start, %d at the end.\n",
		LoadAvg(), goroutines, end)
}

// CPUModel returns the CPU model /proc/cpuinfo names, for the machine line.
func CPUModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// LoadAvg returns the 1, 5 and 15 minute load averages.
func LoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "unknown"
}
