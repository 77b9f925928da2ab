// A compiled load generator for the ztunnel benchmarks, so the client is never what is measured:
//
//	loadgen rr   -target ip:port [-socks ip:port -source ip] -n 2000 -size 1024
//	    one connection, n sequential request/responses of size bytes; latency percentiles
//	loadgen conn -target ip:port [-socks ip:port -source ip] -seconds 5 -c 8 -size 1024 [-count N]
//	    new connections as fast as possible (c at a time), each one request/response; with
//	    -count, stop after N connections (or -seconds, whichever comes first)
//	loadgen load -target ip:port -c 16 -seconds 5 -size 1024 [-rate 1000]
//	    c keep-alive connections, request/responses back to back on each (the most the path
//	    carries), or with -rate a fixed total of rate per second spread evenly over them
//	    (latency counted from when each request was due, so a stall is not hidden)
//	loadgen hold -target ip:port -n 5000 -c 64 -size 1024
//	    open n connections (c dialling at a time), one request/response on each, and keep them
//	    open: prints a JSON line once they are all up (or failed), then waits for stdin to close
//	    or SIGTERM/SIGINT, closes them and exits
//
// Prints one JSON object (hold: one line when the connections are up). With -socks,
// connections go through a SOCKS5 proxy (RFC 1928, no authentication) — ztunnel's outbound
// entry in loopback mode — bound to -source.
// Build: go build -o /tmp/loadgen loadgen.go
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func dial(target, socks, source string) (net.Conn, error) {
	dialer := net.Dialer{Timeout: 10 * time.Second}
	if source != "" {
		dialer.LocalAddr = &net.TCPAddr{IP: net.ParseIP(source)}
		// Pick the source port at connect time (IP_BIND_ADDRESS_NO_PORT), or a fixed source IP
		// runs out of ports within seconds at thousands of connections per second.
		dialer.Control = func(network, address string, c syscall.RawConn) error {
			var err error
			c.Control(func(fd uintptr) {
				err = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, 24, 1)
			})
			return err
		}
	}
	if socks == "" {
		return dialer.Dial("tcp", target)
	}
	conn, err := dialer.Dial("tcp", socks)
	if err != nil {
		return nil, err
	}
	host, portText, err := net.SplitHostPort(target)
	if err != nil {
		conn.Close()
		return nil, err
	}
	var port int
	fmt.Sscanf(portText, "%d", &port)
	ip := net.ParseIP(host).To4()
	if ip == nil {
		conn.Close()
		return nil, errors.New("loadgen: SOCKS5 target must be an IPv4 address")
	}
	req := []byte{5, 1, 0, 5, 1, 0, 1}
	req = append(req, ip...)
	req = binary.BigEndian.AppendUint16(req, uint16(port))
	if _, err := conn.Write(req); err != nil { // greeting and request pipelined
		conn.Close()
		return nil, err
	}
	reply := make([]byte, 12)
	if _, err := io.ReadFull(conn, reply); err != nil {
		conn.Close()
		return nil, err
	}
	if reply[0] != 5 || reply[1] != 0 || reply[3] != 0 {
		conn.Close()
		return nil, fmt.Errorf("loadgen: SOCKS5 refused (reply %v)", reply)
	}
	return conn, nil
}

func roundTrip(conn net.Conn, payload, buf []byte) error {
	if _, err := conn.Write(payload); err != nil {
		return err
	}
	_, err := io.ReadFull(conn, buf)
	return err
}

func percentile(sorted []time.Duration, p float64) float64 {
	i := int(p * float64(len(sorted)-1))
	return float64(sorted[i].Microseconds())
}

// keepAlive runs c connections, each doing request/responses until the deadline: back to back
// (rate 0) or each at rate/c per second, staggered so the total arrives evenly. It returns the
// latencies (from when each request was due), the failures and the first error.
func keepAlive(target, socks, source string, c int, size int, seconds, rate float64) map[string]any {
	payload := make([]byte, size)
	conns := make([]net.Conn, 0, c)
	for i := 0; i < c; i++ {
		conn, err := dial(target, socks, source)
		if err == nil { // warm-up: the path is up end to end before the clock starts
			err = roundTrip(conn, payload, make([]byte, size))
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		conns = append(conns, conn)
	}
	var interval time.Duration
	if rate > 0 {
		interval = time.Duration(float64(c) / rate * float64(time.Second))
	}
	lats := make([][]time.Duration, c)
	var failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	deadline := start.Add(time.Duration(seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for w, conn := range conns {
		wg.Add(1)
		go func(w int, conn net.Conn) {
			defer wg.Done()
			defer conn.Close()
			buf := make([]byte, size)
			due := start
			if interval > 0 {
				due = start.Add(interval * time.Duration(w) / time.Duration(c))
			}
			for {
				if interval > 0 {
					if wait := time.Until(due); wait > 0 {
						time.Sleep(wait)
					}
				} else {
					due = time.Now()
				}
				if !due.Before(deadline) {
					return
				}
				if err := roundTrip(conn, payload, buf); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					return // the connection is broken
				}
				lats[w] = append(lats[w], time.Since(due))
				if interval > 0 {
					due = due.Add(interval)
				}
			}
		}(w, conn)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	out := map[string]any{
		"connections":         c,
		"requests":            len(all),
		"failed":              failed.Load(),
		"seconds":             elapsed,
		"requests_per_second": float64(len(all)) / elapsed,
		"rate":                rate,
	}
	if len(all) > 0 {
		sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
		out["p50_us"] = percentile(all, 0.50)
		out["p90_us"] = percentile(all, 0.90)
		out["p99_us"] = percentile(all, 0.99)
		out["max_us"] = float64(all[len(all)-1].Microseconds())
	}
	if e := firstErr.Load(); e != nil {
		out["first_error"] = e
	}
	return out
}

// hold opens n connections, c dialling at a time, with one request/response on each, and keeps
// them open until stdin closes or a signal comes. It prints one JSON line once all are up.
func hold(target, socks, source string, n, c, size int) {
	payload := make([]byte, size)
	held := make([]net.Conn, 0, n)
	var mu sync.Mutex
	var failed atomic.Int64
	var firstErr atomic.Value
	var next atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, size)
			for next.Add(1) <= int64(n) {
				conn, err := dial(target, socks, source)
				if err == nil {
					err = roundTrip(conn, payload, buf)
					if err != nil {
						conn.Close()
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				mu.Lock()
				held = append(held, conn)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	out := map[string]any{
		"mode":    "hold",
		"target":  target,
		"held":    len(held),
		"failed":  failed.Load(),
		"seconds": time.Since(start).Seconds(),
	}
	if e := firstErr.Load(); e != nil {
		out["first_error"] = e
	}
	json.NewEncoder(os.Stdout).Encode(out)
	done := make(chan struct{}, 2)
	go func() {
		io.Copy(io.Discard, os.Stdin)
		done <- struct{}{}
	}()
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
		<-stop
		done <- struct{}{}
	}()
	<-done
	for _, conn := range held {
		conn.Close()
	}
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen rr|conn|load|hold [flags]")
		os.Exit(2)
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	target := fs.String("target", "", "ip:port")
	socks := fs.String("socks", "", "SOCKS5 proxy ip:port")
	source := fs.String("source", "", "source IP")
	n := fs.Int("n", 2000, "request/responses (rr), connections (hold)")
	size := fs.Int("size", 1024, "bytes per request and response")
	seconds := fs.Float64("seconds", 5, "duration (conn)")
	concurrency := fs.Int("c", 8, "connections in flight (conn, load), dialling at a time (hold)")
	count := fs.Int("count", 0, "stop after this many connections (conn; 0: -seconds only)")
	rate := fs.Float64("rate", 0, "total requests per second (load; 0: as fast as they go)")
	fs.Parse(os.Args[2:])
	payload := make([]byte, *size)
	out := map[string]any{"mode": mode, "target": *target, "socks": *socks, "size": *size}

	switch mode {
	case "rr":
		conn, err := dial(*target, *socks, *source)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		buf := make([]byte, *size)
		for i := 0; i < 50; i++ { // warm-up
			if err := roundTrip(conn, payload, buf); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
		}
		lat := make([]time.Duration, *n)
		for i := range lat {
			start := time.Now()
			if err := roundTrip(conn, payload, buf); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			lat[i] = time.Since(start)
		}
		conn.Close()
		sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
		out["requests"] = *n
		out["p50_us"] = percentile(lat, 0.50)
		out["p90_us"] = percentile(lat, 0.90)
		out["p99_us"] = percentile(lat, 0.99)
	case "conn":
		var ok, failed, started atomic.Int64
		var firstErr atomic.Value
		deadline := time.Now().Add(time.Duration(*seconds * float64(time.Second)))
		var wg sync.WaitGroup
		start := time.Now()
		for w := 0; w < *concurrency; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, *size)
				for time.Now().Before(deadline) {
					if *count > 0 && started.Add(1) > int64(*count) {
						return
					}
					conn, err := dial(*target, *socks, *source)
					if err == nil {
						err = roundTrip(conn, payload, buf)
						conn.Close()
					}
					if err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
						continue
					}
					ok.Add(1)
				}
			}()
		}
		wg.Wait()
		elapsed := time.Since(start).Seconds()
		out["connections"] = ok.Load()
		out["failed"] = failed.Load()
		out["connections_per_second"] = float64(ok.Load()) / elapsed
		if e := firstErr.Load(); e != nil {
			out["first_error"] = e
		}
	case "load":
		for k, v := range keepAlive(*target, *socks, *source, *concurrency, *size, *seconds, *rate) {
			out[k] = v
		}
	case "hold":
		hold(*target, *socks, *source, *n, *concurrency, *size)
		return
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", mode)
		os.Exit(2)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
