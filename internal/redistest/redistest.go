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
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
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
	// tls, when set, is how clients reach a server that speaks only TLS.
	tls *tls.Config
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

	c := redis.NewClient(&redis.Options{Addr: s.Addr(), MaxRetries: -1, DialTimeout: time.Second, TLSConfig: s.tls})
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
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), ContextTimeoutEnabled: true, TLSConfig: s.tls})
	tb.Cleanup(func() { c.Close() })
	return c
}

// StartTLS starts a redis-server that speaks only TLS, with a certificate
// for 127.0.0.1 and "localhost" from a certificate authority made for the
// test, and returns it and the path of that authority's PEM file.
func StartTLS(tb testing.TB) (*Server, string) {
	tb.Helper()
	dir := tb.TempDir()
	caFile, certFile, keyFile, pool := makeCerts(tb, dir)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	s := &Server{tb: tb, path: Path(tb), dir: dir, port: port,
		tls: &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}}
	// --port 0 turns plain TCP off; the TLS port is the server's port.
	s.extra = []string{"--port", "0", "--tls-port", strconv.Itoa(port),
		"--tls-cert-file", certFile, "--tls-key-file", keyFile, "--tls-ca-cert-file", caFile,
		"--tls-auth-clients", "no"}
	s.Restart()
	tb.Cleanup(s.Stop)
	return s, caFile
}

// makeCerts writes a certificate authority and a server certificate signed
// by it into dir.
func makeCerts(tb testing.TB, dir string) (caFile, certFile, keyFile string, pool *x509.CertPool) {
	tb.Helper()
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			tb.Fatal(err)
		}
		return path
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "redistest CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		tb.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		tb.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(ca)
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", der),
		write("server.key", "EC PRIVATE KEY", keyDER), pool
}
