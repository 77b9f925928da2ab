// A compiled load generator for the ztunnel benchmarks, so the client is never what is measured:
//
//	loadgen rr   -target ip:port [-socks ip:port -source ip] -n 2000 -size 1024
//	    one connection, n sequential request/responses of size bytes; latency percentiles
//	loadgen conn -target ip:port [-socks ip:port -source ip] -seconds 5 -c 8 -size 1024
//	    new connections as fast as possible (c at a time), each one request/response
//
// Prints one JSON object. With -socks, connections go through a SOCKS5 proxy (RFC 1928, no
// authentication) — ztunnel's outbound entry in loopback mode — bound to -source.
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

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen rr|conn [flags]")
		os.Exit(2)
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	target := fs.String("target", "", "ip:port")
	socks := fs.String("socks", "", "SOCKS5 proxy ip:port")
	source := fs.String("source", "", "source IP")
	n := fs.Int("n", 2000, "request/responses (rr)")
	size := fs.Int("size", 1024, "bytes per request and response")
	seconds := fs.Float64("seconds", 5, "duration (conn)")
	concurrency := fs.Int("c", 8, "connections in flight (conn)")
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
		var ok, failed atomic.Int64
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
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", mode)
		os.Exit(2)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
