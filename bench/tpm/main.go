// Command tpm measures token limiting against an upstream with a hidden
// tokens-per-minute limit.
//
// It starts caddytest/fakellm in-process with a hidden TPM limit (a token
// bucket of one minute of tokens, refilled at TPM/60 per second, charged
// prompt + completion when a request arrives) and a fixed usage of 20 prompt
// + 30 completion tokens per request, so every request really costs 50
// tokens. In front of it, an in-process Caddy runs one of two
// configurations, one after the other, each with a fresh fakellm and a fresh
// Caddy:
//
//	(a) reverse_proxy alone;
//	(b) llm_rate_limit with one rule set to the upstream's limit
//	    (limit <tpm> tokens_per_minute, or -rule-tpm), then reverse_proxy.
//
// The load is open-loop: Poisson arrivals at -rate times what the upstream
// can sustain (tpm/50/60 requests per second), for -duration, with the same
// seed, hence the same arrival schedule, for both configurations. Each
// request is a non-streamed OpenAI chat completion whose prompt is 80 ASCII
// characters (20 tokens at the module's default 4 characters per token) and
// whose max_tokens is 30, so the module's admission estimate (50) equals the
// real usage. The client never retries.
//
// Run it from the repository root:
//
//	go run ./bench/tpm -duration 30s
//
// Everything listens on 127.0.0.1 at free ports. Every loop is bounded in
// time and count: the arrival loop by -duration and a hard cap on arrivals,
// each request by -timeout, and the wait for stragglers by -timeout too.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/llmratelimit/caddy-llm-ratelimit"
	"github.com/llmratelimit/caddy-llm-ratelimit/bench/internal/rig"
	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// What every request costs the upstream, as fakellm reports it in usage and
// charges its hidden bucket.
const (
	promptTokens     = 20
	completionTokens = 30
	tokensPerRequest = promptTokens + completionTokens
)

// prompt is exactly 80 ASCII characters, so the module estimates it at
// ceil(80/4) = 20 prompt tokens, the same as fakellm reports. With
// "max_tokens": 30 the admission estimate is exactly the real usage, 50.
const prompt = "Summarise the plot of Hamlet in three short sentences for a reader in a hurry..."

// options are the command-line flags.
type options struct {
	duration    time.Duration // length of the arrival phase
	tpm         int           // the upstream's hidden limit
	ruleTPM     int           // rule (b)'s limit; 0 means tpm
	rate        float64       // offered load as a multiple of what the upstream sustains
	seed        uint64        // seed of the Poisson arrival schedule
	maxInflight int           // bound on requests in flight; arrivals above it are dropped
	timeout     time.Duration // per-request timeout, and the bound on the final drain
	verbose     bool          // show Caddy's logs
}

func main() {
	var o options
	flag.DurationVar(&o.duration, "duration", 30*time.Second, "how long arrivals run, per configuration")
	flag.IntVar(&o.tpm, "tpm", 60000, "the upstream's hidden tokens-per-minute limit")
	flag.IntVar(&o.ruleTPM, "rule-tpm", 0, "the limit of rule (b) in tokens per minute (default: -tpm, the upstream's own limit)")
	flag.Float64Var(&o.rate, "rate", 2.0, "offered load as a multiple of what the upstream sustains (tpm/50/60 requests/s)")
	flag.Uint64Var(&o.seed, "seed", 1, "seed of the Poisson arrival schedule (the same for both configurations)")
	flag.IntVar(&o.maxInflight, "max-inflight", 256, "most requests in flight; an arrival above it is dropped by the load generator")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "per-request timeout")
	flag.BoolVar(&o.verbose, "v", false, "show Caddy's logs on stderr")
	flag.Parse()
	if o.ruleTPM == 0 {
		o.ruleTPM = o.tpm
	}
	if err := o.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "tpm:", err)
		os.Exit(2)
	}

	configs := []struct {
		name    string
		limiter bool
	}{
		{"(a) reverse_proxy alone", false},
		{"(b) llm_rate_limit + reverse_proxy", true},
	}
	var results []result
	for _, c := range configs {
		fmt.Fprintf(os.Stderr, "running %s for %s ...\n", c.name, o.duration)
		r, err := runConfig(c.name, c.limiter, o)
		if err != nil {
			fmt.Fprintf(os.Stderr, "tpm: %s: %v\n", c.name, err)
			os.Exit(1)
		}
		results = append(results, r)
	}
	report(os.Stdout, o, results)
}

func (o options) validate() error {
	switch {
	case o.duration <= 0 || o.duration > time.Hour:
		return errors.New("-duration must be in (0, 1h]")
	case o.tpm < tokensPerRequest || o.tpm > 1e9 || o.ruleTPM < tokensPerRequest || o.ruleTPM > 1e9:
		return fmt.Errorf("-tpm and -rule-tpm must be in [%d, 1e9]", tokensPerRequest)
	case !(o.rate > 0) || o.rate > 1000:
		return errors.New("-rate must be in (0, 1000]")
	case o.maxInflight < 1 || o.maxInflight > 100000:
		return errors.New("-max-inflight must be in [1, 100000]")
	case o.timeout <= 0 || o.timeout > 10*time.Minute:
		return errors.New("-timeout must be in (0, 10m]")
	}
	return nil
}

// arrivalRate is the offered load in requests per second: rate times what
// the upstream sustains.
func (o options) arrivalRate() float64 {
	return o.rate * float64(o.tpm) / tokensPerRequest / 60
}

// capacity is the tokens the upstream could serve over the run: its bucket
// starts full (one minute of tokens) and refills at TPM/60 per second.
func (o options) capacity() float64 {
	return float64(o.tpm) + float64(o.tpm)/60*o.duration.Seconds()
}

// result is what one configuration measured.
type result struct {
	name      string
	limiterOn bool // configuration (b)

	// The arrivals the Poisson schedule produced, those not sent because
	// maxInflight were in flight, and the arrival loop's worst lateness
	// behind its schedule.
	rig.Arrivals
	sent int // requests actually sent

	ok        int   // client got a 2xx
	client429 int   // client got a 429 (from the module or passed on from the upstream)
	other     int   // client got another status
	errs      int   // transport errors and timeouts
	usage     int64 // sum of usage.total_tokens over the 2xx bodies
	badUsage  int   // 2xx bodies whose usage was not tokensPerRequest
	latencies []time.Duration

	// upstream429At are the times, since the start of arrivals, at which
	// the client received a 429 written by the upstream itself (recognised
	// by fakellm's OpenAI-style message), to tell where a leak happens.
	upstream429At []time.Duration

	upstreamTotal   int // requests that reached fakellm
	upstreamLimited int // of those, refused by its hidden limit

	drained bool // every request finished before the drain bound
}

// runConfig starts a fresh fakellm and a fresh in-process Caddy, runs the
// load through them and stops both.
func runConfig(name string, limiter bool, o options) (result, error) {
	res := result{name: name, limiterOn: limiter}
	up, err := fakellm.Start(fakellm.Config{
		TPM:              o.tpm,
		PromptTokens:     promptTokens,
		CompletionTokens: completionTokens,
		RateLimitHeaders: true,
	})
	if err != nil {
		return res, err
	}
	defer up.Close()

	port, err := rig.FreePort()
	if err != nil {
		return res, err
	}
	if err := loadCaddy(caddyfile(port, rig.Upstream(up), limiter, o)); err != nil {
		return res, err
	}
	defer rig.StopCaddy("tpm")

	runLoad(&res, rig.ChatURL(port), o)
	res.upstreamTotal, res.upstreamLimited = up.Counts()
	return res, nil
}

// caddyfile is the configuration under test: reverse_proxy to the fake
// upstream, after an llm_rate_limit rule set to the upstream's own limit
// when limiter is true.
func caddyfile(port int, upstream string, limiter bool, o options) string {
	block := ""
	if limiter {
		block = fmt.Sprintf("\tllm_rate_limit {\n\t\trule upstream-tpm {\n\t\t\tlimit %d tokens_per_minute\n\t\t}\n\t}\n", o.ruleTPM)
	}
	return rig.Caddyfile(fmt.Sprintf(":%d", port), upstream, block, o.verbose)
}

// loadCaddy adapts a Caddyfile and loads it into the process's Caddy. It
// is not rig.LoadCaddy: its adapt error shows the whole Caddyfile.
func loadCaddy(caddyfile string) error {
	cfg, err := rig.Adapt(caddyfile)
	if err != nil {
		return fmt.Errorf("adapting:\n%s\n%w", caddyfile, err)
	}
	return caddy.Load(cfg, true)
}

// requestBody is the OpenAI chat completion every request sends.
func requestBody() []byte {
	b, err := json.Marshal(map[string]any{
		"model":      "gpt-4o-mini",
		"max_tokens": completionTokens,
		"messages":   []map[string]string{{"role": "user", "content": prompt}},
	})
	if err != nil {
		panic(err)
	}
	return b
}

// runLoad sends open-loop Poisson arrivals to url for o.duration and waits
// (at most o.timeout) for the requests in flight to finish.
func runLoad(res *result, url string, o options) {
	body := requestBody()
	client := &http.Client{Timeout: o.timeout, Transport: rig.Transport(o.maxInflight)}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), o.duration+o.timeout)
	defer cancel()

	lambda := o.arrivalRate()
	res.latencies = make([]time.Duration, 0, int(lambda*o.duration.Seconds())+16)

	var (
		mu sync.Mutex // guards res while requests are in flight
		wg sync.WaitGroup
	)
	start := time.Now()
	p := rig.Poisson{
		RNG:         rig.RNG(o.seed, 0x7470_6d62_656e_6368), // same schedule for every configuration
		Rate:        lambda,
		Start:       start,
		Deadline:    start.Add(o.duration),
		MaxInflight: o.maxInflight,
	}
	res.Arrivals = p.Run(ctx, &wg, func(int) func() {
		return func() { one(ctx, client, url, body, start, res, &mu) }
	})
	res.sent = res.Scheduled - res.Dropped

	// Wait for the requests in flight, bounded: each has its own timeout,
	// and ctx ends o.timeout after the arrival phase. Drain watches
	// context.Background(), not ctx: ctx ends some 5 s before the bound,
	// and the requests its end aborts still finish within the bound, so
	// they count as drained.
	res.drained = rig.Drain(context.Background(), cancel, &wg, o.timeout+5*time.Second)
}

// one sends a single request, never retrying, and records its outcome.
func one(ctx context.Context, client *http.Client, url string, body []byte, start time.Time, res *result, mu *sync.Mutex) {
	req := rig.NewPost(ctx, url, body)
	t0 := time.Now()
	resp, raw, err := rig.Do(client, req)
	lat := time.Since(t0)

	var usage int64 = -1
	if err == nil && resp.StatusCode/100 == 2 {
		var v struct {
			Usage struct {
				TotalTokens int64 `json:"total_tokens"`
			} `json:"usage"`
		}
		if json.Unmarshal(raw, &v) == nil {
			usage = v.Usage.TotalTokens
		}
	}

	mu.Lock()
	defer mu.Unlock()
	switch {
	case err != nil:
		res.errs++
	case resp.StatusCode/100 == 2:
		res.ok++
		res.latencies = append(res.latencies, lat)
		if usage != tokensPerRequest {
			res.badUsage++
		}
		res.usage += max(usage, 0)
	case resp.StatusCode == http.StatusTooManyRequests:
		res.client429++
		if bytes.Contains(raw, []byte("Rate limit reached for")) { // fakellm's wording, not the module's
			res.upstream429At = append(res.upstream429At, time.Since(start))
		}
	default:
		res.other++
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond)) }

// report prints the command, the machine and a markdown table of results.
func report(w io.Writer, o options, results []result) {
	fmt.Fprintf(w, "\n`go run ./bench/tpm %s`\n\n", strings.Join(os.Args[1:], " "))
	fmt.Fprintf(w, "Effective flags: -duration %s -tpm %d -rule-tpm %d -rate %g -seed %d -max-inflight %d. "+
		"Arrivals %.2f req/s (upstream sustains %.2f req/s = %d tokens/s at %d tokens per request).\n\n",
		o.duration, o.tpm, o.ruleTPM, o.rate, o.seed, o.maxInflight,
		o.arrivalRate(), float64(o.tpm)/tokensPerRequest/60, o.tpm/60, tokensPerRequest)
	fmt.Fprintf(w, "Machine: %s, nproc %d, CPU %s, GOMAXPROCS %d, load average at the end %s. "+
		"Load generator, Caddy and the fake upstream share this one process.\n\n",
		runtime.Version(), runtime.NumCPU(), rig.CPUModel(), runtime.GOMAXPROCS(0), rig.LoadAvg())

	capTokens := o.capacity()
	fmt.Fprintln(w, "| configuration | sent | dropped by load gen | client 2xx | client 429 | upstream 429 | other / errors | tokens offered | tokens served | upstream capacity | share used | p50 (2xx) | p99 (2xx) |")
	fmt.Fprintln(w, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
	for _, r := range results {
		slices.Sort(r.latencies)
		served := r.ok * tokensPerRequest
		fmt.Fprintf(w, "| %s | %d | %d | %d | %d (%s) | %d | %d / %d | %d | %d | %.0f | %.1f %% | %s | %s |\n",
			r.name, r.sent, r.Dropped, r.ok, r.client429, rig.Pct(r.client429, r.sent),
			r.upstreamLimited, r.other, r.errs,
			r.sent*tokensPerRequest, served, capTokens, 100*float64(served)/capTokens,
			ms(rig.Percentile(r.latencies, 0.50)), ms(rig.Percentile(r.latencies, 0.99)))
	}
	fmt.Fprintf(w, "\nupstream capacity = TPM + TPM/60 × %.0f s; share used = tokens served ÷ capacity; "+
		"tokens offered = sent × %d.\n", o.duration.Seconds(), tokensPerRequest)
	if off := o.rate * float64(o.tpm) / 60 * o.duration.Seconds(); off < capTokens {
		fmt.Fprintf(w, "Note: the expected offered load (%.0f tokens) is below the capacity (%.0f tokens): "+
			"the upstream's initial full bucket absorbs the excess, so even (a) need not be refused and the share used cannot reach 100 %%. "+
			"To load it beyond its capacity, raise -rate above %.2f",
			off, capTokens, 1+60/o.duration.Seconds())
		if o.rate > 1 {
			fmt.Fprintf(w, " or -duration above %s", time.Duration(60/(o.rate-1)*float64(time.Second)).Round(time.Second))
		}
		fmt.Fprintln(w, ".")
	}

	// Sanity checks, printed only when something is off.
	for _, r := range results {
		var notes []string
		if !r.drained {
			notes = append(notes, "some requests were still in flight after the drain bound")
		}
		if r.badUsage > 0 {
			notes = append(notes, fmt.Sprintf("%d 2xx bodies did not report %d total tokens", r.badUsage, tokensPerRequest))
		}
		if r.usage != int64(r.ok*tokensPerRequest) {
			notes = append(notes, fmt.Sprintf("usage summed over 2xx bodies is %d, not 2xx × %d", r.usage, tokensPerRequest))
		}
		if got := r.upstreamTotal - r.upstreamLimited; got != r.ok {
			notes = append(notes, fmt.Sprintf("the upstream admitted %d requests but the client saw %d 2xx", got, r.ok))
		}
		if r.limiterOn && len(r.upstream429At) > 0 {
			at := make([]string, 0, 5)
			for _, t := range r.upstream429At[:min(5, len(r.upstream429At))] {
				at = append(at, fmt.Sprintf("%.3f s", t.Seconds()))
			}
			notes = append(notes, fmt.Sprintf("the client got upstream 429s at %s after the start", strings.Join(at, ", ")))
		}
		notes = append(notes, fmt.Sprintf("%d requests reached the upstream; the arrival loop ran at most %s behind its schedule",
			r.upstreamTotal, ms(r.MaxLag)))
		fmt.Fprintf(w, "- %s: %s.\n", r.name, strings.Join(notes, "; "))
	}
	if len(results) == 2 {
		b := results[1]
		share := float64(b.ok*tokensPerRequest) / capTokens
		fmt.Fprintf(w, "\nGoals for (b): upstream 429s = %d (goal 0: %s); share used %.1f %% (goal ≥ 95 %%: %s).\n",
			b.upstreamLimited, rig.Verdict(b.upstreamLimited == 0), 100*share, rig.Verdict(share >= 0.95))
	}
}
