package harness

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"testing"
	"time"
)

// SignCrafted signs tmpl as it is (subject, SANs, extra extensions) for
// key's public key, with a day's validity, for server and client use: a
// certificate an attacker holding this CA's key could make.
func (ca *ForeignCA) SignCrafted(t testing.TB, tmpl *x509.Certificate, key crypto.Signer) *Leaf {
	t.Helper()
	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	uri := ""
	if len(tmpl.URIs) > 0 {
		uri = tmpl.URIs[0].String()
	}
	return leafFromPEM(t, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})), uri)
}

// RSAKeyEmbedding returns a working 2048-bit RSA key whose modulus carries
// embed, unaligned, near its top: the modulus is p*q for a random prime p
// and the first prime q above target/p, which leaves target's top half
// unchanged. It is a real key (the TLS handshake proves possession of it),
// just not a secret-looking one.
func RSAKeyEmbedding(t testing.TB, embed []byte) *rsa.PrivateKey {
	t.Helper()
	if len(embed) > 100 {
		t.Fatalf("%d bytes do not fit in the stable half of a 2048-bit modulus", len(embed))
	}
	e := big.NewInt(65537)
	one := big.NewInt(1)
	for attempt := 0; attempt < 20; attempt++ {
		top := make([]byte, 256)
		_, _ = rand.Read(top)
		top[0] |= 0x80
		copy(top[7:], embed)
		target := new(big.Int).SetBytes(top)
		p, err := rand.Prime(rand.Reader, 1024)
		if err != nil {
			t.Fatal(err)
		}
		q := new(big.Int).Div(target, p)
		q.SetBit(q, 0, 1)
		for i := 0; i < 100000 && !q.ProbablyPrime(20); i++ {
			q.Add(q, big.NewInt(2))
		}
		n := new(big.Int).Mul(p, q)
		if n.BitLen() != 2048 || !bytes.Contains(n.Bytes(), embed) {
			continue
		}
		pm, qm := new(big.Int).Sub(p, one), new(big.Int).Sub(q, one)
		phi := new(big.Int).Mul(pm, qm)
		d := new(big.Int).ModInverse(e, phi)
		if d == nil {
			continue // e divides p-1 or q-1
		}
		key := &rsa.PrivateKey{PublicKey: rsa.PublicKey{N: n, E: 65537}, D: d, Primes: []*big.Int{p, q}}
		if err := key.Validate(); err != nil {
			continue
		}
		key.Precompute()
		return key
	}
	t.Fatal("no RSA key with the chosen modulus bytes in 20 attempts")
	return nil
}
