package caddytest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
	"github.com/llmratelimit/caddy-llm-ratelimit/internal/redistest"
)

// childEnv, when set to a Caddyfile's path, makes the test binary a Caddy
// that serves that Caddyfile until it is sent SIGTERM: how the tests run
// several Caddy instances (one process each, as in production) without
// building a binary.
const childEnv = "LLMRL_TEST_CADDY_CHILD"

func TestMain(m *testing.M) {
	if path := os.Getenv(childEnv); path != "" {
		os.Exit(runChildCaddy(path))
	}
	os.Exit(m.Run())
}

// runChildCaddy is the child's whole life: load, serve, stop on a signal.
func runChildCaddy(path string) int {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	b, err := os.ReadFile(path)
	if err == nil {
		err = loadRaw(string(b))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "child caddy:", err)
		return 1
	}
	<-stop
	if err := caddy.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "child caddy: stopping:", err)
		return 1
	}
	return 0
}

// caddyProcess is a Caddy instance in a child process.
type caddyProcess struct {
	base string
	cmd  *exec.Cmd
	done chan struct{}
	log  *strings.Builder
}

// startCaddyProcess starts a child Caddy serving site (a site block on
// port), and waits until it answers. It is stopped at the end of the test.
func startCaddyProcess(t *testing.T, port int, site string) *caddyProcess {
	t.Helper()
	path := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(path, []byte(withGlobalOptions(site)), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &caddyProcess{base: fmt.Sprintf("http://127.0.0.1:%d", port), done: make(chan struct{}), log: new(strings.Builder)}
	p.cmd = exec.Command(os.Args[0], "-test.run=^$")
	p.cmd.Env = append(os.Environ(), childEnv+"="+path)
	w := &lockedWriter{b: p.log}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.stop(t) })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	up := waitFor(ctx, func() bool {
		select {
		case <-p.done:
			return true
		default:
		}
		resp, err := http.Get(p.base + "/healthz-probe")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return true
	})
	select {
	case <-p.done:
		t.Fatalf("child caddy exited at start: %s", w.String())
	default:
	}
	if !up {
		t.Fatalf("child caddy did not answer within 60s: %s", w.String())
	}
	return p
}

// stop sends SIGTERM and waits, bounded, for the child to exit.
func (p *caddyProcess) stop(t *testing.T) {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		t.Errorf("child caddy did not stop within 20s of SIGTERM")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("child caddy exited with %d: %s", code, p.log.String())
	}
}

type lockedWriter struct {
	mu sync.Mutex
	b  *strings.Builder
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// maxInWindow returns the largest sum of weights of the events whose times
// fall in any window [t, t+w), sliding over every event.
func maxInWindow(times []time.Time, weights []int64, w time.Duration) int64 {
	var best, sum int64
	j := 0
	for i := range times {
		sum += weights[i]
		for times[i].Sub(times[j]) >= w {
			sum -= weights[j]
			j++
		}
		best = max(best, sum)
	}
	return best
}

// TestRedisExactAcrossInstances: three Caddy processes share one Redis,
// behind round-robin load at three times the configured limits. What
// reaches the upstream in every window stays within the limit (+3), for a
// request limit whose requests queue (each instance's queue reserving its
// turns in Redis) and for a token limit settled on the real usage.
func TestRedisExactAcrossInstances(t *testing.T) {
	if testing.Short() {
		t.Skip("30 s of load")
	}
	rs := redistest.Start(t)
	// Real usage 50 tokens a request (20 + 30); the module estimates about
	// 1 + 200 (max_tokens) at admission and settles on the 50.
	up := startFake(t, fakellm.Config{PromptTokens: 20, CompletionTokens: 30})
	const (
		reqLimit   = 20   // requests per second, burst 1
		tokLimit   = 1000 // tokens per second
		tokBurst   = 250
		realTokens = 50
		instances  = 3
		duration   = 30 * time.Second
	)
	var procs []*caddyProcess
	for range instances {
		port := freePort(t)
		site := fmt.Sprintf(`:%d {
	llm_rate_limit {
		store redis {
			address %s
			key_prefix exact
			# Exactness, not outages, is under test: a call slowed by
			# the race detector on a busy machine must not count as one.
			timeout 2s
			fail_mode closed
		}
		rule req {
			when {
				models gpt-req
			}
			limit %d requests_per_second burst 1
			queue {
				max_wait 1s
			}
		}
		rule tok {
			when {
				models gpt-tok
			}
			limit %d tokens_per_second burst %d
		}
	}
	reverse_proxy %s
}
`, port, rs.Addr(), reqLimit, tokLimit, tokBurst, hostPort(up))
		procs = append(procs, startCaddyProcess(t, port, site))
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	defer client.CloseIdleConnections()
	body := func(model string) string {
		b, _ := json.Marshal(map[string]any{
			"model":      model,
			"max_tokens": 200,
			"messages":   []map[string]string{{"role": "user", "content": "hi"}},
		})
		return string(b)
	}
	bodies := map[string]string{"gpt-req": body("gpt-req"), "gpt-tok": body("gpt-tok")}
	before := len(up.Requests())

	// Open-loop arrivals: each model at 3 × its limit in requests (the
	// token model's limit is 1000/50 = 20 requests/s of real usage).
	const perSecond = 3 * reqLimit
	gap := time.Second / perSecond
	var wg sync.WaitGroup
	var mu sync.Mutex
	statuses := map[string]map[int]int{"gpt-req": {}, "gpt-tok": {}}
	var failures []string
	start := time.Now()
	for i := 0; time.Since(start) < duration; i++ {
		time.Sleep(time.Until(start.Add(time.Duration(i) * gap)))
		for _, model := range []string{"gpt-req", "gpt-tok"} {
			p := procs[i%instances]
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := client.Post(p.base+"/v1/chat/completions", "application/json", strings.NewReader(bodies[model]))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					failures = append(failures, err.Error())
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				statuses[model][resp.StatusCode]++
			}()
		}
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d requests failed, first: %s", len(failures), failures[0])
	}

	var times = map[string][]time.Time{}
	for _, r := range up.Requests()[before:] {
		model := ""
		for m := range bodies {
			if sha([]byte(bodies[m])) == r.BodySHA256 {
				model = m
			}
		}
		times[model] = append(times[model], r.Arrived)
	}
	for m := range times {
		slices.SortFunc(times[m], func(a, b time.Time) int { return a.Compare(b) })
	}
	ones := func(n int) []int64 {
		w := make([]int64, n)
		for i := range w {
			w[i] = 1
		}
		return w
	}
	reqs := times["gpt-req"]
	reqMax := maxInWindow(reqs, ones(len(reqs)), time.Second)
	toks := times["gpt-tok"]
	tokW := make([]int64, len(toks))
	for i := range tokW {
		tokW[i] = realTokens
	}
	tokMax := maxInWindow(toks, tokW, time.Second)
	secs := duration.Seconds()
	t.Logf("requests: %d forwarded in %.0f s (%.1f/s, limit %d/s), statuses %v, most in any 1 s window %d",
		len(reqs), secs, float64(len(reqs))/secs, reqLimit, statuses["gpt-req"], reqMax)
	t.Logf("tokens: %d requests forwarded, %d real tokens (%.0f/s, limit %d/s), statuses %v, most real tokens in any 1 s window %d",
		len(toks), int64(len(toks))*realTokens, float64(int64(len(toks))*realTokens)/secs, tokLimit, statuses["gpt-tok"], tokMax)

	// The GCRA admits at most its burst plus a window's rate in any
	// window: 1 + 20 requests, 250 + 1000 tokens. Three requests more are
	// allowed for the jitter between admission and arrival upstream.
	if want := int64(1 + reqLimit + 3); reqMax > want {
		t.Errorf("requests: %d reached the upstream within one second, want ≤ %d", reqMax, want)
	}
	if want := int64(tokBurst + tokLimit + 3*realTokens); tokMax > want {
		t.Errorf("tokens: %d real tokens reached the upstream within one second, want ≤ %d", tokMax, want)
	}
	// And the limits are used, not merely respected: the request limit
	// to 90 %, the token limit to 80 % (each request holds its 201-token
	// estimate until it is settled, and every instance's settlement must
	// reach Redis for the refunds to let the next requests in).
	if got := float64(len(reqs)) / secs; got < 0.9*reqLimit {
		t.Errorf("requests: %.1f/s forwarded, want ≥ 90 %% of %d/s", got, reqLimit)
	}
	if got := float64(int64(len(toks))*realTokens) / secs; got < 0.8*tokLimit {
		t.Errorf("tokens: %.0f real tokens/s forwarded, want ≥ 80 %% of %d/s", got, tokLimit)
	}
	for model, st := range statuses {
		for code := range st {
			if code != http.StatusOK && code != http.StatusTooManyRequests {
				t.Errorf("%s: statuses %v, want only 200 and 429", model, st)
			}
		}
	}
	if n := len(times[""]); n > 0 {
		t.Errorf("%d requests reached the upstream with a body that was not sent", n)
	}
}

// redisSite is a site on h's port with a Redis store and a rule of 4
// requests per minute.
func redisSite(h *harness, up *fakellm.Server, storeOptions string) string {
	return h.site(fmt.Sprintf(`		store redis {
%s
		}
		rule r {
			limit 4 requests_per_minute
		}`, storeOptions), hostPort(up))
}

// TestRedisOutage: Redis is killed mid-run, then started again. Each
// fail mode does what it says; every request gets an answer within a
// bound far below the client's patience; the outage is logged once when it
// starts and once when it ends; and the shared limits come back.
func TestRedisOutage(t *testing.T) {
	for _, mode := range []string{"open", "closed", "local"} {
		t.Run(mode, func(t *testing.T) {
			rs := redistest.Start(t)
			up := startFake(t, fakellm.Config{})
			h := newHarness(t)
			logPath := filepath.Join(t.TempDir(), "caddy.log")
			site := redisSite(h, up, fmt.Sprintf("\t\t\taddress %s\n\t\t\tkey_prefix outage-%s\n\t\t\ttimeout 50ms\n\t\t\tfail_mode %s\n\t\t\tinstances 2", rs.Addr(), mode, mode))
			cfg := fmt.Sprintf("{\n\tadmin off\n\tpersist_config off\n\tauto_https off\n\tdefault_bind 127.0.0.1\n\tlog {\n\t\toutput file %s\n\t\tformat json\n\t\tlevel INFO\n\t}\n}\n\n%s", logPath, site)
			if err := loadRaw(cfg); err != nil {
				t.Fatalf("loading: %v\n%s", err, cfg)
			}
			// timed sends one request and checks that it took less than
			// a second: the store's timeout is 50 ms, and a dead Redis on
			// loopback refuses connections at once.
			timed := func(what string) response {
				t.Helper()
				start := time.Now()
				r := h.chat("gpt-4o")
				if d := time.Since(start); d > time.Second {
					t.Errorf("%s: took %v with a 50 ms store timeout", what, d)
				}
				return r
			}
			count := func(what string, n int) map[int]int {
				got := map[int]int{}
				for i := range n {
					got[timed(fmt.Sprintf("%s %d", what, i)).status]++
				}
				return got
			}

			if got := count("redis up", 6); got[200] != 4 || got[429] != 2 {
				t.Fatalf("with Redis up: %v, want 4 × 200 and 2 × 429", got)
			}
			rs.Stop()
			var r response
			switch mode {
			case "open":
				if got := count("redis down", 6); got[200] != 6 {
					t.Errorf("fail open: %v, want 6 × 200", got)
				}
			case "closed":
				for i := range 6 {
					r = timed(fmt.Sprintf("redis down %d", i))
					wantStatus(t, "fail closed", r, http.StatusServiceUnavailable)
					var e openAIError
					decodeStrict(t, "fail closed", r.body, &e)
					if e.Error.Type != "server_error" || r.header.Get("Retry-After") == "" {
						t.Errorf("fail closed: type %q, Retry-After %q: want server_error and a Retry-After", e.Error.Type, r.header.Get("Retry-After"))
					}
				}
			case "local":
				// 4 per minute over 2 instances: 2 each, from a fresh
				// local bucket.
				if got := count("redis down", 6); got[200] != 2 || got[429] != 4 {
					t.Errorf("fail local: %v, want 2 × 200 and 4 × 429", got)
				}
			}

			// Back up, empty (no persistence): within a few seconds the
			// store probes it, and the shared limit applies again: at most
			// 4 more requests pass before a 429 (plus those let through by
			// the fail mode before the probe).
			rs.Restart()
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			keys := rs.Client(t)
			back := waitFor(ctx, func() bool {
				timed("redis restarted")
				ks, err := keys.Keys(ctx, "{outage-"+mode+"}*").Result()
				return err == nil && len(ks) > 0
			})
			if !back {
				t.Fatalf("no bucket written to Redis within 15 s of its restart")
			}
			got := count("redis back", 6)
			if got[429] == 0 || got[200]+got[429] != 6 {
				t.Errorf("after recovery: %v, want the shared limit enforced again", got)
			}

			// The outage was logged once at its start and once at its
			// end, at ERROR and INFO, and no message carries a password
			// or a per-request line.
			b, err := os.ReadFile(logPath)
			if err != nil {
				t.Fatal(err)
			}
			log := string(b)
			if n := strings.Count(log, "redis store unreachable"); n != 1 {
				t.Errorf("outage logged %d times, want once:\n%s", n, log)
			}
			if n := strings.Count(log, "redis store answers again"); n != 1 {
				t.Errorf("recovery logged %d times, want once:\n%s", n, log)
			}
			if strings.Contains(log, "limiter store failed") {
				t.Errorf("a request logged a store failure:\n%s", log)
			}
		})
	}
}

// TestRedisReload: a reload keeps the Redis state (trivially: it is in
// Redis) and the client (the same settings share one); a reload that
// changes the settings closes the old client. No connection leaks.
func TestRedisReload(t *testing.T) {
	rs := redistest.Start(t)
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	admin := rs.Client(t)
	ctx := context.Background()
	clients := func() int {
		list, err := admin.ClientList(ctx).Result()
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(list, "\n")
	}
	base := clients()
	load := func(prefix string) {
		h.load(redisSite(h, up, fmt.Sprintf("\t\t\taddress %s\n\t\t\tkey_prefix %s", rs.Addr(), prefix)))
	}
	load("reload")
	for i := range 3 {
		wantStatus(t, fmt.Sprintf("request %d", i), h.chat("gpt-4o"), http.StatusOK)
	}
	conns := clients() - base
	if conns < 1 {
		t.Fatalf("no connection to Redis after three requests")
	}
	for range 5 {
		load("reload")
	}
	if r := h.chat("gpt-4o"); r.status != http.StatusOK || remaining(t, r, "r/requests_per_minute") != 0 {
		t.Fatalf("after five reloads: %v, want the fourth of 4 admitted with 0 remaining", r)
	}
	wantStatus(t, "fifth", h.chat("gpt-4o"), http.StatusTooManyRequests)
	if n := clients() - base; n > conns {
		t.Errorf("%d connections after five reloads with the same settings, %d before", n, conns)
	}
	// Changed settings: a new client each time, the old one closed.
	for i := range 5 {
		load(fmt.Sprintf("changed%d", i))
		wantStatus(t, "changed", h.chat("gpt-4o"), http.StatusOK)
	}
	ctx2, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if !waitFor(ctx2, func() bool { return clients()-base <= conns }) {
		t.Errorf("%d connections after five reloads with changed settings, %d with one client: the old clients leak", clients()-base, conns)
	}
}
