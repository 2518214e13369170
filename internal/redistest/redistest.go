// Package redistest starts real redis-server processes for tests: each on
// a loopback port of its own, with persistence off and its files in a
// temporary directory, killed when the test ends.
//
// Without redis-server on the PATH a test that asks for one is skipped,
// unless the CI environment variable is set: CI installs redis-server, so
// there its absence is a failure.
package redistest

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// quietLog drops go-redis's log lines: tests stop servers on purpose, and
// the client logs every dial that fails then.
type quietLog struct{}

func (quietLog) Printf(context.Context, string, ...any) {}

func init() { redis.SetLogger(quietLog{}) }

// Server is a redis-server process a test started.
type Server struct {
	tb   testing.TB
	path string
	dir  string
	port int
	// extra are more arguments for redis-server.
	extra []string
	cmd   *exec.Cmd
	// exited is closed when the process has exited.
	exited chan struct{}
}

// Path finds redis-server, skipping or failing tb without it (see the
// package comment).
func Path(tb testing.TB) string {
	tb.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			tb.Fatalf("redis-server not found, and CI is set: %v", err)
		}
		tb.Skipf("redis-server not found: %v", err)
	}
	return path
}

// Start starts a redis-server for the test, which kills it at the end.
// extra are more arguments for redis-server (such as cluster mode's).
func Start(tb testing.TB, extra ...string) *Server {
	tb.Helper()
	s := &Server{tb: tb, path: Path(tb), dir: tb.TempDir(), extra: extra}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	s.port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	s.Restart()
	tb.Cleanup(s.Stop)
	return s
}

// Port is the server's port.
func (s *Server) Port() int { return s.port }

// Addr is the server's host:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Restart runs the server on its port, if it does not run, and waits until
// it answers. It starts empty.
func (s *Server) Restart() {
	s.tb.Helper()
	if s.cmd != nil {
		return
	}
	args := append([]string{
		"--port", strconv.Itoa(s.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir,
		"--daemonize", "no", "--loglevel", "warning",
	}, s.extra...)
	s.cmd = exec.Command(s.path, args...)
	var out strings.Builder
	s.cmd.Stdout, s.cmd.Stderr = &out, &out
	if err := s.cmd.Start(); err != nil {
		s.tb.Fatalf("starting redis-server: %v", err)
	}
	exited := make(chan struct{})
	s.exited = exited
	go func(cmd *exec.Cmd) { cmd.Wait(); close(exited) }(s.cmd)

	c := redis.NewClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1, DialTimeout: time.Second})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-exited:
			s.tb.Fatalf("redis-server exited at start: %s", out.String())
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.tb.Fatalf("redis-server did not answer within 10s: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Stop kills the server, if it runs, and waits for it to exit.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		s.tb.Errorf("redis-server %d did not exit within 10s of a kill", s.cmd.Process.Pid)
	}
	s.cmd = nil
}

// Client returns a client of the server, closed at the end of the test.
// ContextTimeoutEnabled makes context deadlines bound network waits, as the
// module configures it.
func (s *Server) Client(tb testing.TB) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), ContextTimeoutEnabled: true})
	tb.Cleanup(func() { c.Close() })
	return c
}
